"""``python -m fastlab.sweep [CONFIG] key=a,b,c other=x,y [fixed=v ...] [--parallel N]
[--metric NAME]``

Runs the grid of every comma-separated override (each run a ``python -m fastlab.train``
process under ``<log.out_dir>/<sweep name>/``), ``--parallel`` of them at once (small runs
share one GPU well; each gets ``train.threads`` for its share of the CPU unless set), then
writes ``results.md``, ``results.json`` and, for two swept keys, a heat map
``heatmap.png`` of ``--metric``: any evaluation metric (the final one) or training metric
(the last log window's, e.g. ``loss``); default the task's first evaluation metric.

The table gives every run's status: finished, stopped, killed or failed. Running the same
sweep again (same ``log.name``) leaves finished runs untouched and continues the others
from their checkpoints.
"""
import itertools
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

from fastlab.report import last_values
from fastlab.train.logger import strict_tree


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


def _threads(base, fixed: List[str], parallel: int) -> List[str]:
    """``train.threads`` for each of ``parallel`` packed runs, unless the sweep sets it."""
    if any(a.startswith("train.threads=") for a in fixed):
        return []
    import torch

    from fastlab.train.environment import default_threads

    cuda = base.train.device.startswith("cuda") or (base.train.device == "auto"
                                                     and torch.cuda.is_available())
    return [f"train.threads={default_threads(torch.device('cuda' if cuda else 'cpu'), parallel)}"]


def _finished_earlier(run_dir: str):
    """The summary of a run this sweep already finished, else None."""
    from fastlab.train.rundir import read_status

    status = read_status(run_dir)
    path = os.path.join(run_dir, "summary.json")
    if not status or status.get("state") != "finished" or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _outcome(run_dir: str, returncode: int) -> str:
    """finished, stopped, killed or failed (with the exit status) for the table."""
    from fastlab.train.rundir import read_status

    state = (read_status(run_dir) or {}).get("state")
    if returncode == 0 and state in ("finished", "stopped"):
        return state
    if returncode < 0:
        return f"killed (signal {-returncode})"
    return f"failed (exit {returncode})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    file, fixed, grid, parallel, metric = parse(argv)
    from fastlab.train.config import build_config

    try:
        base = build_config(file, fixed)  # validates the fixed part before anything runs
        for key, values in grid.items():  # and every swept value
            for v in values:
                build_config(file, fixed + [f"{key}={v}"])
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sweep_dir = os.path.join(base.log.out_dir, base.log.name or
                             f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(sweep_dir, exist_ok=True)
    threads = _threads(base, fixed, parallel)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    pending = []
    results = []
    for combo in combos:  # a re-run leaves finished runs as they are
        done = _finished_earlier(os.path.join(sweep_dir, _run_name(combo)))
        if done is None:
            pending.append(combo)
        else:
            results.append({**done, "config": combo, "returncode": 0, "status": "finished",
                            "rerun": False})
            print(f"{_run_name(combo)}: finished earlier, left as it is", flush=True)
    running: List[Tuple[dict, subprocess.Popen]] = []
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            combo = pending.pop(0)
            name = _run_name(combo)
            cmd = [sys.executable, "-m", "fastlab.train"] + ([file] if file else []) + fixed + \
                threads + [f"{k}={v}" for k, v in combo.items()] + \
                [f"log.out_dir={sweep_dir}", f"log.name={name}", "log.progress=false"]
            log = open(os.path.join(sweep_dir, f"{name}.log"), "a")
            running.append((combo, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        for item in list(running):
            combo, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            name = _run_name(combo)
            run_dir = os.path.join(sweep_dir, name)
            summary_path = os.path.join(run_dir, "summary.json")
            summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
            status = _outcome(run_dir, proc.returncode)
            if not status.startswith(("finished", "stopped")):
                summary = {"final": last_values(run_dir, "eval"),
                           "last_train": last_values(run_dir, "train")}
            results.append({**summary, "config": combo, "returncode": proc.returncode,
                            "status": status, "rerun": True})
            print(f"{name}: {status} final={summary.get('final')}"
                  + ("" if status == "finished" else f" (see {name}.log)"), flush=True)
        time.sleep(0.2)
    wall = time.perf_counter() - started
    order = {_run_name(c): i for i, c in enumerate(combos)}
    results.sort(key=lambda r: order[_run_name(r["config"])])
    with open(os.path.join(sweep_dir, "results.json"), "w") as f:
        json.dump(strict_tree(results), f, indent=2, allow_nan=False)
    packing = throughput([r for r in results if r["rerun"]], parallel, wall)
    with open(os.path.join(sweep_dir, "throughput.json"), "w") as f:
        json.dump(strict_tree(packing), f, indent=2, allow_nan=False)
    if packing["steps_s"]:
        print(f"steps/s per run (training windows): "
              f"{', '.join(f'{v:.0f}' for v in packing['steps_s'])}; {parallel} at once: "
              f"{packing['aggregate_steps_s']:.0f} steps/s together; {packing['steps']} steps "
              f"in {wall:.1f} s of sweep wall time", flush=True)
    metric = metric or _default_metric(results)
    missing = metric and all(math.isnan(_value(r, metric)) for r in results)
    if missing:
        known = sorted({k for r in results for g in ("final", "last_train")
                        for k in (r.get(g) or {})})
        print(f"error: --metric {metric}: no run logged it; known: {', '.join(known)}",
              file=sys.stderr)
    write_table(sweep_dir, grid, results, metric)
    if len(grid) == 2 and metric and not missing:
        heatmap(sweep_dir, grid, results, metric)
    print(f"results in {sweep_dir}")
    return 0 if all(r["returncode"] == 0 for r in results) and not missing else 1


def throughput(results, parallel: int, wall_s: float) -> dict:
    """Each run's training-window steps/s (its last log window) and, for runs that ran
    ``parallel`` at a time, their sum: the steps/s the packed runs reached together."""
    per_run = [(r.get("last_train") or {}).get("steps_s") or 0.0 for r in results]
    at_once = sorted(per_run, reverse=True)[:parallel]
    return {"parallel": parallel, "steps_s": per_run, "aggregate_steps_s": sum(at_once),
            "steps": sum(r.get("steps", 0) for r in results), "wall_s": round(wall_s, 2)}


def _default_metric(results) -> str:
    for r in results:
        if r.get("final"):
            return next(iter(r["final"]))
    return ""


def _value(r, metric) -> float:
    """``metric`` of a run: its final evaluation's, else its last training window's."""
    for group in ("final", "last_train"):
        value = (r.get(group) or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return float("nan")


def write_table(sweep_dir, grid, results, metric) -> None:
    keys = list(grid)
    lines = ["| " + " | ".join(keys + [metric, "status", "tok/s", "wall s"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for r in results:
        last = r.get("last_train") or {}
        tok_s = last.get("tok_s")
        lines.append("| " + " | ".join([r["config"][k] for k in keys] + [
            f"{_value(r, metric):.4f}", r.get("status", ""),
            f"{tok_s:.0f}" if isinstance(tok_s, (int, float)) else "-",
            f"{r.get('wall_s', '-')}"]) + " |")
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
