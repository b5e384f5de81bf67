"""Checkpoints that are never half-written: temp file, fsync, rename, fsync of the folder.

A run directory holds ``ckpt-<step>.pt`` (the last ``keep``) and ``best.pt``. A crash at any
instant leaves either the previous file or the new one, never a torn file under the name.
"""
import glob
import os
import re
from typing import Any, Dict, Optional

import torch

_NAME = re.compile(r"ckpt-(\d+)\.pt$")


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` with torch.save so that ``path`` is always a complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable only once the directory is synced
    finally:
        os.close(fd)


def checkpoints(run_dir: str):
    """``(step, path)`` of the step checkpoints in ``run_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "ckpt-*.pt")):
        m = _NAME.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_step(state: Dict[str, Any], run_dir: str, step: int, keep: int) -> str:
    """Save ``state`` as ``ckpt-<step>.pt`` and delete all but the newest ``keep``."""
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    atomic_save(state, path)
    for _, old in checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def latest(run_dir: str) -> Optional[str]:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)
