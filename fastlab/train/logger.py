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
        return f"{value:.2e}"
    return str(value)


def _strict(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


#: the progress line never grows past this many columns
WIDTH = 100


class RunLogger:
    """Writes every record to metrics.jsonl (strict JSON); shows a progress line on stderr.

    ``time`` in a record is the run's own clock: seconds of training so far, continued
    across resumes from ``elapsed`` (the value the checkpoint saved), and ``unix`` the wall
    clock. A run resumed from the checkpoint of ``resume_step`` (0 for a restart without
    one) first drops the records of steps after it, which the interrupted run wrote and the
    resumed run writes again.
    """

    def __init__(self, run_dir: str, total_steps: int, enabled: bool = True,
                 progress: bool = True, resume_step: Optional[int] = None,
                 elapsed: float = 0.0, start_step: int = 0):
        self.enabled = enabled
        self.total = total_steps
        self.progress = progress and enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time() - elapsed
        self._start = (time.time(), start_step)
        path = os.path.join(run_dir, "metrics.jsonl")
        if enabled and resume_step is not None and os.path.exists(path):
            drop_records_after(path, resume_step)
        self._file = open(path, "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                sys.stderr.write("note: tensorboard is not installed; metrics go to "
                                 "metrics.jsonl only (pip install tensorboard for TB logs)\n")
            else:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier starts of it included."""
        return time.time() - self.t0

    def log(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(self.elapsed(), 3),
                  "unix": round(time.time(), 3), **{k: _strict(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def line(self, step: int, values: Dict[str, Any]) -> str:
        """``step/total elapsed<ETA`` then as many ``key=value`` fields as fit in WIDTH."""
        now = time.time()
        t_start, s_start = self._start
        rate = (step - s_start) / max(now - t_start, 1e-9)
        eta = _clock((self.total - step) / rate) if rate > 0 and step < self.total else "-"
        frac = step / self.total
        bar = "#" * int(8 * frac) + "-" * (8 - int(8 * frac))
        line = f"[{bar}] {step}/{self.total} {_clock(self.elapsed())}<{eta}"
        for key, value in values.items():
            field = f" {key}={_fmt(value)}"
            if len(line) + len(field) > WIDTH:
                break
            line += field
        return line

    def show(self, step: int, values: Dict[str, Any], final: bool = False) -> None:
        if not self.progress:
            return
        line = self.line(step, values)
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
            if isinstance(record, dict) and record.get("step", step + 1) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def strict_tree(value: Any) -> Any:
    """``value`` with every non-finite float inside dicts and lists replaced by None."""
    if isinstance(value, dict):
        return {k: strict_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_tree(v) for v in value]
    return _strict(value)


def write_json(path: str, data: Dict[str, Any], indent: Optional[int] = 2) -> None:
    """Strict JSON (non-finite floats as null), replaced atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_tree(data), f, indent=indent, allow_nan=False)
    os.replace(tmp, path)
