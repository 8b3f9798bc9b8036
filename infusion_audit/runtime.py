"""The process's compute settings, set one way for every command and recorded with every run.

Torch's CPU kernels (and the BLAS under numpy) split sums across threads, so the thread count changes the order floats are
added in and with it the last bits of every gradient; a long training run can amplify those bits.
One thread per process gives the same arithmetic on every machine, which is why it is the default.
The device is the other setting: CUDA kernels sum in their own order too, so a run on `cuda` gives other last bits
than one on `cpu` (the device is part of what a trained checkpoint and a bench cell are keyed by). On cuda the process
uses deterministic kernels in full fp32 (no TF32), so two runs, or two workers recrafting one poisoning, agree.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_THREADS = 1
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where torch finds a CUDA device, else cpu


def set_threads(n: int = DEFAULT_THREADS) -> None:
    """Use `n` threads in this process for torch and for the BLAS/OpenMP pools numpy, scipy and scikit-learn
    compute with (the CLI's --threads; each bench worker calls it too), so no environment variable is needed."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(max(1, int(n)))
    threadpool_limits(limits=max(1, int(n)))


def resolve_device(name: str = "auto") -> torch.device:
    """The device `name` (one of DEVICES) means in this process: `auto` is cuda where torch finds a CUDA device,
    else cpu; `cuda` where there is none is a one-line UserError, not a failure deep inside the first kernel.
    Resolving to cuda also sets this process's CUDA kernels deterministic and fp32 (`deterministic_cuda`)."""
    import torch

    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"device cuda asked for, but {why} (torch {torch.__version__}); use --device cpu or auto")
    if name == "cuda":
        deterministic_cuda()
    return torch.device(name)


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels where torch has them (a warning names any op without one) and fp32 convolutions
    instead of cuDNN's default TF32, whose 10-bit mantissa would swamp the small effects an audit measures."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when its first handle is made
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live (cpu for one without any): what every computation on it follows."""
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def device_info(device: str) -> dict:
    """What provenance.json records about the device: its name and, on cuda, which GPU (results depend on it)."""
    import torch

    info = {"device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def threads_info() -> dict:
    """What provenance.json records about the compute: torch threads in this process and the machine's cores."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def configure(threads: int = DEFAULT_THREADS, device: str | None = None) -> dict:
    """TEMPORARY (the runtime slice replaces it): threads, and cuda's deterministic settings."""
    set_threads(threads)
    if device is not None and resolve_device(device).type == "cuda":
        deterministic_cuda()
    return {"threads": threads, "device": device}


def runtime_info(device: str) -> dict:
    """TEMPORARY (the runtime slice replaces it)."""
    return {**threads_info(), **device_info(device)}
