"""Run outputs: the progress line, metrics.jsonl and (when installed) TensorBoard events."""
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


class RunLogger:
    """Writes every record to metrics.jsonl; shows a progress line on stderr.

    A run resumed from the checkpoint of ``resume_step`` first drops the records of steps
    after it, which the interrupted run wrote and the resumed run writes again.
    """

    def __init__(self, run_dir: str, total_steps: int, enabled: bool = True,
                 progress: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.total = total_steps
        self.progress = progress and enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        path = os.path.join(run_dir, "metrics.jsonl")
        if enabled and resume_step is not None and os.path.exists(path):
            drop_records_after(path, resume_step)
        self._file = open(path, "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)
            except Exception:  # tensorboard is optional
                self._tb = None

    def log(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time() - self.t0, 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def show(self, step: int, values: Dict[str, Any], final: bool = False) -> None:
        if not self.progress:
            return
        frac = step / self.total
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        fields = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        line = f"[{bar}] {step}/{self.total} {fields}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def event(self, step: int, message: str, **values: Any) -> None:
        """Something the reader must see (a spike, a rollback, a checkpoint, a resume)."""
        if not self.enabled:
            return
        if self.progress and self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"step {step}: {message}\n")
        self.log("event", step, {"message": message, **values})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: str, step: int) -> None:
    """Rewrite the jsonl file ``path`` (atomically) without the records of steps > ``step``."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # the torn last line of a killed run
                continue
            if record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, data: Dict[str, Any], indent: Optional[int] = 2) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(tmp, path)
