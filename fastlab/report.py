"""``python -m fastlab.report RUN_DIR``: PNG plots and a Markdown summary of a run.

Plots every numeric series of metrics.jsonl by kind (train: each loss, lr, throughput,
phase times, GPU utilisation; eval: each metric) and writes ``report.md`` beside them.
"""
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple


def read_records(run_dir: str) -> Tuple[List[dict], int]:
    """The records of metrics.jsonl and how many lines could not be read (the torn last
    line of a killed run, or damage)."""
    records, bad = [], 0
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return records, bad
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict) and "kind" in rec and isinstance(rec.get("step"), int):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def read_metrics(run_dir: str) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """``{kind: {key: [(step, value), ...]}}`` from metrics.jsonl; a null (a non-finite
    value) is NaN, a gap in the plot."""
    series: Dict[str, Dict[str, List[Tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for rec in read_records(run_dir)[0]:
        for key, value in rec.items():
            if key in ("kind", "step", "time", "unix") or isinstance(value, bool):
                continue
            if value is None:
                value = float("nan")
            if isinstance(value, (int, float)):
                series[rec["kind"]][key].append((rec["step"], float(value)))
    return series


def last_values(run_dir: str, kind: str) -> Dict[str, float]:
    """The latest value of each numeric key among records of ``kind``."""
    out: Dict[str, float] = {}
    for key, points in read_metrics(run_dir).get(kind, {}).items():
        out[key] = points[-1][1]
    return out


# panels of the report: (file name, title, kind, keys matched by prefix)
PANELS = [
    ("loss.png", "training loss", "train", ["loss"]),
    ("eval.png", "evaluation", "eval", [""]),
    ("lr.png", "learning rate", "train", ["lr"]),
    ("throughput.png", "throughput (tokens/s)", "train", ["tok_s"]),
    ("phases.png", "phase time per step (ms)", "train", ["ms_"]),
    ("gpu.png", "GPU utilisation (%) and MFU", "train", ["gpu_util", "mfu"]),
    ("grad_norm.png", "gradient norm", "train", ["grad_norm"]),
]


def plot(run_dir: str, out_dir: str = None) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fastlab.report needs matplotlib: pip install matplotlib") from None
    out_dir = out_dir or run_dir
    series = read_metrics(run_dir)
    written = []
    for name, title, kind, prefixes in PANELS:
        keys = [k for k in series.get(kind, {}) if any(k.startswith(p) for p in prefixes)]
        keys = [k for k in keys if not (prefixes == ["loss"] and k != "loss")]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted(keys):
            steps, values = zip(*series[kind][key])
            ax.plot(steps, [v * 100 if key == "mfu" else v for v in values],
                    label=key + (" (%)" if key == "mfu" else ""))
        finite = [v for _, v in series[kind].get("loss", []) if math.isfinite(v)]
        if name == "loss.png" and finite and min(finite) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summary_markdown(run_dir: str, plots: List[str]) -> str:
    """The run's summary; for a run without summary.json (running, killed or failed) its
    status and the last logged values."""
    from fastlab.train.rundir import read_status

    status = read_status(run_dir) or {}
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = None
    records, bad = read_records(run_dir)
    lines = [f"# Run {os.path.basename(os.path.abspath(run_dir))}", ""]
    state = status.get("state", "finished" if summary else "unknown")
    lines.append(f"- **status**: {state}" + (f" ({status['error']})" if status.get("error")
                                              else ""))
    if summary is None:
        last_step = max((r["step"] for r in records), default=0)
        lines.append(f"- **last logged step**: {last_step} (no summary.json: the run has "
                     "not ended cleanly)")
        summary = {"final": last_values(run_dir, "eval"),
                   "last_train": last_values(run_dir, "train")}
    else:
        for key in ("steps", "stopped_by", "device", "precision", "world_size", "params",
                    "tokens", "rollbacks", "wall_s", "best"):
            lines.append(f"- **{key}**: {summary.get(key)}")
    if bad:
        lines.append(f"- **unreadable metrics lines skipped**: {bad}")
    for group in ("final", "last_train"):
        if summary.get(group):
            lines += ["", f"## {group.replace('_', ' ')}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in summary[group].items()]
    lines += [""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m fastlab.report RUN_DIR")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run_dir = argv[0]
    if not os.path.isdir(run_dir):
        print(f"error: {run_dir}: no such run directory", file=sys.stderr)
        return 2
    plots = plot(run_dir)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(summary_markdown(run_dir, plots))
    print(f"wrote {len(plots)} plots and report.md to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
