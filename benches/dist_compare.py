"""Compare the runs of benches/dist_check.sh: loss curves of 2 ranks against 1, tokens/s,
scaling efficiency, and runs resumed on another world size against the original run.

    python benches/dist_compare.py RUNS_DIR OUT.json [--plot OUT.png] [--tol 0.005]

Losses are the logged window means (``log.every`` steps each). A pair matches when every
window's loss is within ``--tol`` (relative) of the reference window at the same step.
"""
import argparse
import json
import os
import re
import statistics
import sys

# (run, reference, what): 2 ranks against 1 with the same global batch
SAME_BATCH = [("ddp", "single", "DDP on 2 GPUs vs 1 GPU"),
              ("fsdp", "single", "FSDP2 on 2 GPUs vs 1 GPU")]
# (resumed run, original run, what): the original continued on its own world size
RESUMED = [("ddp-to-1", "ddp", "saved by DDP on 2 GPUs, resumed on 1"),
           ("fsdp-to-1", "fsdp", "saved by FSDP2 on 2 GPUs, resumed on 1"),
           ("single-to-2ddp", "single", "saved on 1 GPU, resumed by DDP on 2"),
           ("single-to-2fsdp", "single", "saved on 1 GPU, resumed by FSDP2 on 2")]


def read_run(path):
    train, events = {}, []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for record in map(json.loads, f):
            if record["kind"] == "train":
                train[record["step"]] = record
            elif record["kind"] == "event":
                events.append(record)
    summary_path = os.path.join(path, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else None
    return {"train": train, "events": events, "summary": summary}


def resumed_from(run):
    for e in run["events"]:
        m = re.search(r"resumed from ckpt-(\d+)", e.get("message", ""))
        if m:
            return int(m.group(1))
    return None


def compare(run, ref, after=0):
    steps = sorted(s for s in run["train"] if s in ref["train"] and s > after)
    if not steps:
        return None
    rel = [abs(run["train"][s]["loss"] - ref["train"][s]["loss"]) / abs(ref["train"][s]["loss"])
           for s in steps]
    worst = max(range(len(steps)), key=rel.__getitem__)
    return {"steps": [steps[0], steps[-1]], "windows": len(steps),
            "max_rel_diff": rel[worst], "at_step": steps[worst],
            "median_rel_diff": statistics.median(rel), "first_rel_diff": rel[0],
            "loss_run_last": run["train"][steps[-1]]["loss"],
            "loss_ref_last": ref["train"][steps[-1]]["loss"]}


def speed(run, skip=2):
    """Medians over this process's log windows after its first ``skip`` (compilation,
    warm-up); a resumed run's records from before the resume are the original run's."""
    start = resumed_from(run) or 0
    records = [run["train"][s] for s in sorted(run["train"]) if s > start][skip:]
    keys = ("tok_s", "steps_s", "mfu", "ms_data", "ms_forward", "ms_backward", "ms_optimizer",
            "gpu_util", "gpu_mem_gb")
    return {k: statistics.median(r[k] for r in records) for k in keys
            if records and all(k in r for r in records)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs")
    p.add_argument("out")
    p.add_argument("--plot")
    p.add_argument("--tol", type=float, default=5e-3)
    args = p.parse_args(argv)
    runs = {name: read_run(os.path.join(args.runs, name)) for name in sorted(os.listdir(args.runs))
            if os.path.exists(os.path.join(args.runs, name, "metrics.jsonl"))}
    result = {"tolerance_rel": args.tol, "runs": {}, "same_batch": [], "resumed": []}
    for name, run in runs.items():
        s = run["summary"] or {}
        result["runs"][name] = {"world_size": s.get("world_size"), "steps": s.get("steps"),
                                "params": s.get("params"), "precision": s.get("precision"),
                                "wall_s": s.get("wall_s"), "final": s.get("final"),
                                "resumed_from": resumed_from(run), **speed(run)}
    ok = True
    for a, b, what in SAME_BATCH:
        if a in runs and b in runs:
            c = compare(runs[a], runs[b])
            c.update(run=a, reference=b, what=what, match=c["max_rel_diff"] <= args.tol)
            one, two = result["runs"][b].get("tok_s"), result["runs"][a].get("tok_s")
            if one and two:
                c["tok_s_1gpu"], c["tok_s_2gpu"] = one, two
                c["scaling_efficiency"] = two / (2 * one)
            result["same_batch"].append(c)
            ok &= c["match"]
    for a, b, what in RESUMED:
        if a in runs and b in runs:
            start = resumed_from(runs[a])
            c = compare(runs[a], runs[b], after=start or 0)
            if c is None or start is None:
                result["resumed"].append({"run": a, "reference": b, "what": what, "match": False,
                                          "error": "no resumed steps to compare"})
                ok = False
                continue
            c.update(run=a, reference=b, what=what, resumed_from=start,
                     match=c["max_rel_diff"] <= args.tol)
            result["resumed"].append(c)
            ok &= c["match"]
    result["all_match"] = bool(ok)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for c in result["same_batch"] + result["resumed"]:
        if "error" in c:
            print(f"{c['what']}: {c['error']}")
            continue
        eff = (f"; tokens/s {c['tok_s_2gpu']:.0f} vs {c['tok_s_1gpu']:.0f}, scaling efficiency "
               f"{c['scaling_efficiency']:.3f}") if "scaling_efficiency" in c else ""
        print(f"{c['what']}: steps {c['steps'][0]}-{c['steps'][1]}, max rel loss diff "
              f"{c['max_rel_diff']:.2e} (step {c['at_step']}), median {c['median_rel_diff']:.2e}, "
              f"{'match' if c['match'] else 'MISMATCH'}{eff}")
    if args.plot:
        plot(runs, result, args.plot)
    return 0 if ok else 1


def plot(runs, result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, run in runs.items():
        steps = sorted(run["train"])
        start = result["runs"][name]["resumed_from"] or 0
        steps = [s for s in steps if s > start]
        style = "--" if start else "-"
        top.plot(steps, [run["train"][s]["loss"] for s in steps], style, label=name)
    top.set_yscale("log")
    top.set_ylabel("train loss (window mean)")
    top.legend(fontsize=8)
    for name, ref in [(c["run"], c["reference"]) for c in result["same_batch"] + result["resumed"]
                      if "error" not in c]:
        start = result["runs"][name]["resumed_from"] or 0
        steps = [s for s in sorted(runs[name]["train"]) if s in runs[ref]["train"] and s > start]
        bottom.plot(steps, [abs(runs[name]["train"][s]["loss"] / runs[ref]["train"][s]["loss"] - 1)
                            for s in steps], label=f"{name} vs {ref}")
    bottom.axhline(result["tolerance_rel"], color="k", lw=0.8, ls=":")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative loss difference")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
