"""What this machine offers a training process: the device it trains on."""

from __future__ import annotations


class NoComputeError(RuntimeError):
    pass


def visible_gpus() -> list[str]:
    if not _nvidia_driver():  # NVML says so in milliseconds; torch's own CUDA probe takes ~1.5 s to find nothing
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _nvidia_driver() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def local_device(preference: str = "auto") -> str:
    """'cuda:0' when a GPU is visible (and not refused), else 'cpu'; a request that needs a GPU fails without one."""
    gpus = [] if preference == "cpu" else visible_gpus()
    if gpus:
        return "cuda:0"
    if preference == "cuda":
        raise NoComputeError(
            "the request needs a GPU (device='cuda') and none is visible to torch on this machine; "
            "set device to 'auto' or 'cpu', or choose a compute profile with GPUs"
        )
    return "cpu"
