"""``python -m fastlab.sweep [CONFIG] key=a,b,c other=x,y [fixed=v ...] [--parallel N]``

Runs the grid of every comma-separated override (each run a ``python -m fastlab.train``
process under ``<log.out_dir>/<sweep name>/``), ``--parallel`` of them at once (small runs
share one GPU well), then writes ``results.md``, ``results.json`` and, for two swept keys, a
heat map ``heatmap.png`` of the final metric.
"""
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple


def parse(argv: List[str]) -> Tuple[str, List[str], Dict[str, List[str]], int, str]:
    file, fixed, grid, parallel, metric = None, [], {}, 1, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("--parallel", "--metric"):
            if not args:
                raise SystemExit(f"error: {a} needs a value")
            value = args.pop(0)
            if a == "--metric":
                metric = value
            elif not value.isdigit() or int(value) < 1:
                raise SystemExit(f"error: --parallel expects a positive integer, got {value!r}")
            else:
                parallel = int(value)
        elif "=" not in a and file is None:
            file = a
        elif "=" in a and "," in a.split("=", 1)[1]:
            key, values = a.split("=", 1)
            grid[key] = [v for v in values.split(",") if v]
        else:
            fixed.append(a)
    if not grid:
        raise SystemExit("fastlab.sweep needs at least one key=a,b,... to sweep")
    return file, fixed, grid, parallel, metric


def _run_name(combo: Dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    file, fixed, grid, parallel, metric = parse(argv)
    from fastlab.train.config import build_config

    base = build_config(file, fixed)  # validates the fixed part before anything runs
    for key, values in grid.items():  # and every swept value
        for v in values:
            build_config(file, fixed + [f"{key}={v}"])
    sweep_dir = os.path.join(base.log.out_dir, base.log.name or
                             f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(sweep_dir, exist_ok=True)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    pending = list(combos)
    running: List[Tuple[dict, subprocess.Popen]] = []
    results = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            combo = pending.pop(0)
            name = _run_name(combo)
            cmd = [sys.executable, "-m", "fastlab.train"] + ([file] if file else []) + fixed + \
                [f"{k}={v}" for k, v in combo.items()] + \
                [f"log.out_dir={sweep_dir}", f"log.name={name}", "log.progress=false"]
            log = open(os.path.join(sweep_dir, f"{name}.log"), "w")
            running.append((combo, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        for item in list(running):
            combo, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            name = _run_name(combo)
            summary_path = os.path.join(sweep_dir, name, "summary.json")
            summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
            results.append({**summary, "config": combo, "returncode": proc.returncode})
            print(f"{name}: rc={proc.returncode} final={summary.get('final')}", flush=True)
        time.sleep(0.2)
    wall = time.perf_counter() - started
    order = {_run_name(c): i for i, c in enumerate(combos)}
    results.sort(key=lambda r: order[_run_name(r["config"])])
    with open(os.path.join(sweep_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    packing = throughput(results, parallel, wall)
    with open(os.path.join(sweep_dir, "throughput.json"), "w") as f:
        json.dump(packing, f, indent=2)
    print(f"steps/s per run (training windows): "
          f"{', '.join(f'{v:.0f}' for v in packing['steps_s'])}; {parallel} at once: "
          f"{packing['aggregate_steps_s']:.0f} steps/s together; {packing['steps']} steps in "
          f"{wall:.1f} s of sweep wall time", flush=True)
    metric = metric or _default_metric(results)
    write_table(sweep_dir, grid, results, metric)
    if len(grid) == 2 and metric:
        heatmap(sweep_dir, grid, results, metric)
    print(f"results in {sweep_dir}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


def throughput(results, parallel: int, wall_s: float) -> dict:
    """Each run's training-window steps/s (its last log window) and, for runs that ran
    ``parallel`` at a time, their sum: the steps/s the packed runs reached together."""
    per_run = [(r.get("last_train") or {}).get("steps_s", 0.0) for r in results]
    at_once = sorted(per_run, reverse=True)[:parallel]
    return {"parallel": parallel, "steps_s": per_run, "aggregate_steps_s": sum(at_once),
            "steps": sum(r.get("steps", 0) for r in results), "wall_s": round(wall_s, 2)}


def _default_metric(results) -> str:
    for r in results:
        if r.get("final"):
            return next(iter(r["final"]))
    return ""


def _value(r, metric):
    return (r.get("final") or {}).get(metric, float("nan"))


def write_table(sweep_dir, grid, results, metric) -> None:
    keys = list(grid)
    lines = ["| " + " | ".join(keys + [metric, "tok/s", "wall s"]) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for r in results:
        last = r.get("last_train") or {}
        lines.append("| " + " | ".join([r["config"][k] for k in keys] + [
            f"{_value(r, metric):.4f}", f"{last.get('tok_s', float('nan')):.0f}",
            f"{r.get('wall_s', float('nan'))}"]) + " |")
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def heatmap(sweep_dir, grid, results, metric) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (k1, v1), (k2, v2) = grid.items()
    table = [[float("nan")] * len(v2) for _ in v1]
    for r in results:
        table[v1.index(r["config"][k1])][v2.index(r["config"][k2])] = _value(r, metric)
    fig, ax = plt.subplots(figsize=(1.2 * len(v2) + 3, 0.8 * len(v1) + 2))
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(v2)), v2)
    ax.set_yticks(range(len(v1)), v1)
    ax.set_xlabel(k2)
    ax.set_ylabel(k1)
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w")
    fig.colorbar(im, label=metric)
    ax.set_title(f"{metric} over {k1} x {k2}")
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "heatmap.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
