"""How many elements one working block may use on a device.

On CPU the caller's fixed budget is returned unchanged (its constants were tuned for
speed there, and results must not move). On CUDA a block is sized from the memory free
now, so a large card takes few large blocks (fewer kernel launches and top-k passes) and
a busy one small blocks instead of running out of memory. Which neighbours tie and how
ties are broken do not depend on the blocks; only float32 rounding of a product can.
"""
from __future__ import annotations

import torch

# Share of the free memory one block's working set may take: the rest is left for the
# outputs, the allocator's rounding and whatever else shares the card.
FREE_FRACTION = 0.5
# Larger blocks than this (1 GiB of float32) gain nothing measurable and only delay the
# next allocation of everyone else on the card.
CUDA_MAX_ELEMENTS = 1 << 28
# Floor: a block smaller than this (a 256 x 256 Gram tile) is launch overhead only. When
# even it does not fit, the search tries it anyway and torch reports the out-of-memory.
MIN_ELEMENTS = 1 << 16


def free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on a CUDA device can get: free on the card plus what
    PyTorch's caching allocator holds but no tensor uses (it hands that out first)."""
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def block_elements(device, cpu_elements: int, bytes_per_element: int) -> int:
    """Elements one working block may hold on `device`.

    `cpu_elements`: the fixed budget used off CUDA. `bytes_per_element`: the working
    memory one element of the block costs, all temporaries counted (a float32 Gram block
    that may be sorted with int64 indices costs far more than its 4 bytes). On CUDA:
    FREE_FRACTION of the free memory over that, at most CUDA_MAX_ELEMENTS, at least
    MIN_ELEMENTS."""
    if cpu_elements < 1:
        raise ValueError(f"cpu_elements={cpu_elements} must be >= 1")
    if bytes_per_element < 1:
        raise ValueError(f"bytes_per_element={bytes_per_element} must be >= 1")
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_elements
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device}: CUDA is not available here")
    budget = int(free_bytes(device) * FREE_FRACTION) // bytes_per_element
    return max(MIN_ELEMENTS, min(budget, CUDA_MAX_ELEMENTS))
