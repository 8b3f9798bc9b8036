"""The process's compute settings, set one way for every command and recorded with every run.

Torch's CPU kernels (and the BLAS under numpy) split sums across threads, so the thread count changes the order floats are
added in and with it the last bits of every gradient; a long training run can amplify those bits.
One thread per process gives the same arithmetic on every machine, which is why it is the default.
"""

from __future__ import annotations

import os

DEFAULT_THREADS = 1


def set_threads(n: int = DEFAULT_THREADS) -> None:
    """Use `n` threads in this process for torch and for the BLAS/OpenMP pools numpy, scipy and scikit-learn
    compute with (the CLI's --threads; each bench worker calls it too), so no environment variable is needed."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(max(1, int(n)))
    threadpool_limits(limits=max(1, int(n)))


def threads_info() -> dict:
    """What provenance.json records about the compute: torch threads in this process and the machine's cores."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
