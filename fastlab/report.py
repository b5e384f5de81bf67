"""``python -m fastlab.report RUN_DIR``: PNG plots and a Markdown summary of a run.

Plots every numeric series of metrics.jsonl by kind (train: each loss, lr, throughput,
phase times, GPU utilisation; eval: each metric) and writes ``report.md`` beside them.
"""
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Tuple


def read_metrics(run_dir: str) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """``{kind: {key: [(step, value), ...]}}`` from metrics.jsonl."""
    series: Dict[str, Dict[str, List[Tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            for key, value in rec.items():
                if key in ("kind", "step", "time") or not isinstance(value, (int, float)):
                    continue
                series[rec["kind"]][key].append((rec["step"], float(value)))
    return series


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
        if name == "loss.png" and min(v for _, v in series[kind]["loss"]) > 0:
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
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    lines = [f"# Run {os.path.basename(os.path.abspath(run_dir))}", ""]
    for key in ("steps", "stopped_by", "device", "precision", "world_size", "params", "tokens",
                "rollbacks", "wall_s", "best"):
        lines.append(f"- **{key}**: {summary.get(key)}")
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
    plots = plot(run_dir)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(summary_markdown(run_dir, plots))
    print(f"wrote {len(plots)} plots and report.md to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
