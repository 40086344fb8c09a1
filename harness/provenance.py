"""Facts recorded beside every result so a number can be traced to how it was made."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import harness


def git_hash() -> str | None:
    """The project's commit (with '+dirty' when the tree has changes), or None outside git."""
    root = Path(harness.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def versions() -> dict:
    """Installed versions, read from package metadata (importing transformers is slow)."""
    out = {"python": platform.python_version(), "harness": harness.__version__}
    for name in ("torch", "numpy", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "python -m harness" if prog == "__main__.py" else prog
    return " ".join([prog] + sys.argv[1:])
