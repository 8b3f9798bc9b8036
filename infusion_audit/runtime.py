"""The process's compute settings, set once and explicitly by `configure`, and recorded with every run.

Torch's CPU kernels (and the BLAS under numpy) split sums across threads, so the thread count changes the order floats are
added in and with it the last bits of every gradient; a long training run can amplify those bits.
One thread per process gives the same order on every machine, which is why it is the default; the instruction set
torch's kernels use (AVX2, AVX-512, ...) still differs between machines, so provenance records it.
The device is the other setting: CUDA kernels sum in their own order too, so a run on `cuda` gives other last bits
than one on `cpu` (the device is part of what a trained checkpoint and a bench cell are keyed by). On cuda the process
uses deterministic kernels in full fp32 (no TF32), so two runs, or two workers recrafting one poisoning, agree.
Looking a device up (`resolve_device`) changes none of this.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

DEFAULT_THREADS = 1
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where torch finds a CUDA device, else cpu


def configure(threads: int | None = DEFAULT_THREADS, device: str | None = None) -> dict:
    """Set this process up to compute: the one place its process-wide settings change (the command line, bench(),
    scan() and every executor worker call it first). `threads` torch threads and as many in the BLAS/OpenMP pools
    already loaded, and in OMP_NUM_THREADS & co for the pools loaded later (scikit-learn's OpenMP) and for child
    processes; where `device` resolves to cuda (None: wherever torch finds one, since a config read later may choose
    it), deterministic fp32 CUDA kernels. `threads` None keeps the count set before (a worker's device set-up).
    Idempotent; returns what it set."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    cuda = resolve_device(device or "auto").type == "cuda"
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)
    for pool in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[pool] = str(threads)
    if cuda:
        _deterministic_cuda()
    return {"threads": threads, "deterministic_cuda": cuda}


def resolve_device(name: str = "auto") -> torch.device:
    """The device `name` (one of DEVICES) means in this process, and nothing else: `auto` is cuda where torch finds a
    CUDA device, else cpu; `cuda` where there is none is a one-line UserError, not a failure deep inside the first
    kernel. Changes no setting (`configure` does)."""
    import torch

    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"device cuda asked for, but {why} (torch {torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def _deterministic_cuda() -> None:
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


def runtime_info(device: str) -> dict:
    """What provenance.json records about where a run computed, since each of these changes the last bits of its
    numbers: torch threads, the machine's cores, the instruction set torch's CPU kernels use (ATEN_CPU_CAPABILITY,
    when set, is what capped it), the device and, on cuda, which GPU."""
    import torch

    info = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device}
    if "ATEN_CPU_CAPABILITY" in os.environ:
        info["aten_cpu_capability"] = os.environ["ATEN_CPU_CAPABILITY"]
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
