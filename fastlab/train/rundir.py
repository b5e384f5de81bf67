"""A run directory belongs to one run: what is in it, whether a start may use it, and
the record of who is writing it.

- :func:`existing_run` says whether a directory already holds a run.
- :func:`move_aside` renames such a directory to ``NAME.old-K`` (``log.overwrite=true``);
  nothing is ever deleted.
- :func:`config_changes` compares the config a run was saved with to the one it resumes
  with: a change of the model's shape is refused by the loop, the rest is logged.
- ``status.json`` says whether the run is running (with its pid), finished, stopped or
  failed (with the error); a run killed with ``kill -9`` stays "running" with a pid that
  no longer exists, which :func:`read_status` reports as "killed".
- ``config_history.jsonl`` keeps the config of every start of the run.
"""
import json
import os
import socket
import time
from typing import Any, Dict, List, Optional

from fastlab.train.logger import write_json

#: files whose presence means a run has used the directory
RUN_FILES = ("metrics.jsonl", "config.json", "summary.json", "best.pt", "status.json")


def existing_run(run_dir: str) -> bool:
    if not os.path.isdir(run_dir):
        return False
    names = os.listdir(run_dir)
    return any(n in RUN_FILES or (n.startswith("ckpt-") and n.endswith(".pt")) for n in names)


def move_aside(run_dir: str) -> str:
    """Rename ``run_dir`` to the first free ``run_dir.old-K``; returns the new path."""
    k = 1
    while os.path.exists(f"{run_dir}.old-{k}"):
        k += 1
    aside = f"{run_dir}.old-{k}"
    os.replace(run_dir, aside)
    return aside


def free_name(path: str) -> str:
    """``path`` if nothing is there, else ``path-2``, ``path-3``, ... (default run names
    made within the same second)."""
    if not os.path.exists(path):
        return path
    k = 2
    while os.path.exists(f"{path}-{k}"):
        k += 1
    return f"{path}-{k}"


def config_changes(old: Dict[str, Dict[str, Any]], new: Dict[str, Dict[str, Any]]
                   ) -> List[str]:
    """``section.key old -> new`` for every value that differs."""
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changes.append(f"{section}.{key} {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def shape_mismatches(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Parameters and buffers whose names or shapes differ between two state dicts."""
    problems = []
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            problems.append(f"{key} is in the checkpoint but not in the model")
        elif key not in saved:
            problems.append(f"{key} is in the model but not in the checkpoint")
        elif tuple(saved[key].shape) != tuple(current[key].shape):
            problems.append(f"{key}: checkpoint {tuple(saved[key].shape)}, model "
                            f"{tuple(current[key].shape)}")
    return problems


def append_config_history(run_dir: str, step: int, config: Dict[str, Any],
                          changes: List[str]) -> None:
    record = {"unix": round(time.time(), 3), "step": step, "changes": changes, "config": config}
    with open(os.path.join(run_dir, "config_history.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def write_status(run_dir: str, state: str, step: int, **extra: Any) -> None:
    """``state``: running, finished, stopped or failed."""
    write_json(os.path.join(run_dir, "status.json"),
               {"state": state, "step": step, "pid": os.getpid(), "host": socket.gethostname(),
                "unix": round(time.time(), 3), **extra})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_status(run_dir: str) -> Optional[Dict[str, Any]]:
    """``status.json`` with a running run whose process is gone on this host shown as
    "killed"; None for a directory without one."""
    path = os.path.join(run_dir, "status.json")
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if status.get("state") == "running" and status.get("host") == socket.gethostname() \
            and not _alive(int(status.get("pid", -1))):
        status["state"] = "killed"
    return status
