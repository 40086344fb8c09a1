"""Checks before work that the schema cannot make: N read from metadata.json (so a `k`
beyond N is listed with every other problem), and whether a model's CUDA device exists
in the interpreter that model runs in (each model may have its own environment)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def quick_n(data_dir: Path, drop_empty: bool) -> int | None:
    """N from metadata.json alone (before the full data check), None when unreadable."""
    try:
        meta = json.loads((Path(data_dir) / "metadata.json").read_text())
        n = int(meta["num_samples"])
        if drop_empty:
            n -= sum(1 for t in meta.get("task_descriptions", []) if not str(t).strip())
        return n
    except (OSError, ValueError, KeyError, TypeError):
        return None


def k_problems(ks: list, n: int, drop_empty: bool) -> list[str]:
    return [f"k_values[{i}] = {k}: must be in [1, N-1] = [1, {n - 1}] (N = {n} samples"
            f"{' after drop_empty_tasks' if drop_empty else ''})"
            for i, k in enumerate(ks) if isinstance(k, int) and not 1 <= k <= n - 1]


_CUDA_PROBE = ("import torch, sys; n = torch.cuda.device_count() if torch.cuda.is_available() "
               "else 0; sys.stdout.write(str(n))")


def cuda_problem(python: str, device: str) -> str | None:
    """Why `device` (cuda or cuda:N) cannot work in the model's interpreter, else None.
    Asked of that interpreter: each model may run in its own environment."""
    count = _cuda_devices(python)
    _, _, index = device.partition(":")
    index = int(index) if index.isdigit() else 0
    if count is None:
        return f"could not ask {python} whether CUDA is available"
    if count == 0:
        return f"CUDA is not available to {python} (use device = 'cpu' or 'auto')"
    if index >= count:
        return f"{python} sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


_CUDA_SEEN: dict[str, int | None] = {}


def _cuda_devices(python: str) -> int | None:
    if python not in _CUDA_SEEN:
        if python == sys.executable:
            import torch
            _CUDA_SEEN[python] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        else:
            try:
                done = subprocess.run([python, "-c", _CUDA_PROBE], capture_output=True,
                                      text=True, timeout=120)
                _CUDA_SEEN[python] = int(done.stdout) if done.returncode == 0 else None
            except (OSError, ValueError, subprocess.SubprocessError):
                _CUDA_SEEN[python] = None
    return _CUDA_SEEN[python]
