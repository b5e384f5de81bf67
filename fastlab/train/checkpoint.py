"""Checkpoints that are never half-written and never trusted unchecked.

A run directory holds ``ckpt-<step>.pt`` (the last ``keep``) and ``best.pt``.

- Written atomically: temp file, fsync, rename, fsync of the folder. A crash at any
  instant leaves either the previous file or the new one under the name.
- Checksummed: a file is a one-line header (magic, SHA-256 and length of the payload)
  followed by the payload, the ``torch.save`` bytes of the state. :func:`load` verifies
  length and digest before unpickling anything, so a truncated file or flipped bytes
  inside a tensor are reported by name instead of loading silently.
- Rotation deletes old checkpoints only after the new one has been read back and
  verified, so the newest good checkpoint is never the one deleted.
- :func:`load_latest` walks back from the newest checkpoint to the first one that
  verifies and says which it skipped and why.
"""
import glob
import hashlib
import io
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

_NAME = re.compile(r"ckpt-(\d+)\.pt$")
MAGIC = b"FASTLAB-CKPT 1"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: truncated, damaged or not a checkpoint."""


def _header(payload: bytes) -> bytes:
    return b"%s sha256=%s bytes=%d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(),
                                         len(payload))


def atomic_save(obj: Any, path: str) -> None:
    """Write ``obj`` (checksummed) so that ``path`` is always a complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_header(payload))
            f.write(payload)
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


def _read_verified(path: str) -> bytes:
    """The payload of ``path`` after checking its length and SHA-256."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        header = f.readline(256)
        fields = header.split()
        if not header.startswith(MAGIC) or len(fields) != 4 or not header.endswith(b"\n"):
            raise CheckpointError(f"{path}: not a fastlab checkpoint (no checksum header)")
        try:
            digest = fields[2].split(b"=", 1)[1].decode()
            size = int(fields[3].split(b"=", 1)[1])
        except (IndexError, ValueError):
            raise CheckpointError(f"{path}: damaged checksum header") from None
        payload = f.read(size + 1)
    if len(payload) != size:
        raise CheckpointError(f"{name}: truncated or padded ({len(payload)} payload bytes, "
                              f"the header says {size})")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{name}: checksum mismatch (the file was damaged after it "
                              "was written)")
    return payload


def verify(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is complete and undamaged."""
    _read_verified(path)


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """The state saved in ``path``, verified first (:class:`CheckpointError` if it fails)."""
    payload = _read_verified(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # a verified payload that still fails to unpickle
        raise CheckpointError(f"{os.path.basename(path)}: cannot be read ({exc})") from None


def checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of the step checkpoints in ``run_dir``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "ckpt-*.pt")):
        m = _NAME.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_step(state: Dict[str, Any], run_dir: str, step: int, keep: int) -> str:
    """Save ``state`` as ``ckpt-<step>.pt``; once it reads back verified, delete the oldest
    beyond ``keep`` (rotation counts by step: checkpoints of later steps, left by a run
    this one refused to mix with, are never there; see the loop's run-directory check)."""
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    atomic_save(state, path)
    verify(path)  # raises, deleting nothing, if the disk gave back something else
    for _, old in checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


def latest(run_dir: str) -> Optional[str]:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def load_latest(run_dir: str, check=None) -> Tuple[Optional[str], Optional[Dict[str, Any]],
                                                   List[str]]:
    """The newest checkpoint of ``run_dir`` that verifies (and passes ``check(state)``,
    which raises :class:`CheckpointError` to reject one): ``(path, state, problems)``, with
    ``problems`` naming each newer file skipped and why. ``(None, None, problems)`` when
    none is usable."""
    problems = []
    for _, path in reversed(checkpoints(run_dir)):
        try:
            state = load(path)
            if check is not None:
                check(state)
            return path, state, problems
        except CheckpointError as exc:
            problems.append(str(exc))
    return None, None, problems
