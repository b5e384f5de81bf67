"""Collect the runs under a folder into one JSON: python benches/collect_runs.py RUNS OUT.json

Per run directory (at any depth): its config, summary, the eval curve and, for the task's
metric, the first step (and run time) at which it reached 0.9, 0.97, 0.99 and 1.0.
"""
import json
import os
import platform
import sys

import torch

THRESHOLDS = (0.9, 0.97, 0.99, 1.0)


def collect(run_dir: str) -> dict:
    from fastlab.report import read_records
    from fastlab.tasks import resolve

    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    metric = resolve(cfg["task"]["name"]).metric
    records, _ = read_records(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    reached = {}
    for t in THRESHOLDS:
        hit = next((r for r in evals if (r.get(metric) or 0) >= t), None)
        reached[str(t)] = None if hit is None else {"step": hit["step"], "time_s": hit["time"]}
    summary_path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    return {"config": cfg, "metric": metric, "reached": reached, "summary": summary,
            "eval": [{k: v for k, v in r.items() if k not in ("kind", "unix")} for r in evals]}


def main(root: str, out: str) -> None:
    runs = {}
    for folder, _, files in os.walk(root):
        if "config.json" in files and "metrics.jsonl" in files:
            runs[os.path.relpath(folder, root)] = collect(folder)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    data = {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "runs": runs}
    with open(out, "w") as f:
        json.dump(data, f, indent=1)
    for name, r in sorted(runs.items()):
        final = (r["summary"] or {}).get("final", {})
        print(f"{name}: {r['metric']}={final.get(r['metric'])} reached={r['reached']} "
              f"wall_s={(r['summary'] or {}).get('wall_s')}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
