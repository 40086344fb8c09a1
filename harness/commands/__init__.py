"""One module per `python -m harness` sub-command; each exposes `register(subparsers)`.

Argument checks shared by several commands live here."""
from __future__ import annotations

from harness.errors import HarnessError


def resolve_device(name: str):
    """`--device` value -> torch.device; 'auto' is CUDA when present. Bad names and CUDA
    on a machine without it are errors naming the flag."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"--device {name!r}: not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise HarnessError(f"--device {name}: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
    return device
