"""Training throughput (steps/s) and GPU utilisation: fastlab's trainer against plain loops.

    python3 benches/train_throughput.py --out OUT_DIR/train_throughput.json

For each case (a model size and batch, ``CASES``) the providers are:

* ``eager``, ``compile``, ``compile-reduce-overhead``: a plain PyTorch loop in this file
  over the same fastlab GPT (bf16 autocast, fused AdamW, gradient clipping), the model run
  eagerly, through ``torch.compile`` or through ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs). Its 16 batches are drawn once, on the GPU, before timing, so no data
  pipeline is measured. After a warm-up that includes compilation, 50 timed steps estimate
  the rate, and a window of enough steps to last ``--window-s`` seconds is timed between
  two synchronisations. Its loss must be finite, or it reports no speed.
* ``fastlab-graphs``, ``fastlab-no-graphs``: ``python -m fastlab.train`` in a subprocess
  with ``train.cuda_graphs`` on or off, evaluation and checkpoints pushed past the end.
  Its log windows (``log.every`` steps each) are read back from ``metrics.jsonl``; the
  first, which includes compilation and graph capture, is dropped, and the median of the
  others' steps/s is reported with the raw list.

GPU utilisation is NVML's, sampled every 0.1 s in a background thread
(:class:`fastlab.train.telemetry.GPUSampler`) and averaged over the timed window: by this
process for the plain loops, by the trainer itself for its log windows.

``packed`` runs four seeds of the default case at once on the one GPU with
``python -m fastlab.sweep --parallel 4`` and compares their summed steps/s against one
run alone. Ratios compare only providers measured in the same invocation on the same GPU.
"""
import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastlab.models.gpt import GPT, GPTConfig  # noqa: E402
from fastlab.train.telemetry import GPUSampler  # noqa: E402

CASES = {
    "default": {"n_layer": 2, "d_model": 128, "n_head": 4, "vocab": 12, "seq": 11,
                "batch": 128, "fastlab_args": []},
    "seed": {"n_layer": 1, "d_model": 16, "n_head": 4, "vocab": 12, "seq": 20, "batch": 1024,
             "fastlab_args": ["task.n_digits=6", "model.n_layer=1", "model.d_model=16",
                              "model.n_head=4", "train.batch_size=1024"]},
}
FASTLAB = {"fastlab-graphs": True, "fastlab-no-graphs": False}
PLAIN = ("eager", "compile", "compile-reduce-overhead")
PROVIDERS = tuple(FASTLAB) + PLAIN
N_BATCHES = 16
PROMPT_FRACTION = 0.6
WARMUP_STEPS = 30
ESTIMATE_STEPS = 50
PACKED_RUNS = 4
NO_EVAL_OR_CHECKPOINT = ["eval.every=1000000", "checkpoint.every=1000000"]
MIN_WINDOW_S = 2.0


def make_batches(case: dict) -> List[tuple]:
    """Random token ids and targets whose first positions (the prompt) are ignored."""
    b, s, v = case["batch"], case["seq"], case["vocab"]
    batches = []
    for _ in range(N_BATCHES):
        x = torch.randint(0, v, (b, s), device="cuda", dtype=torch.int64)
        y = torch.randint(0, v, (b, s), device="cuda", dtype=torch.int64)
        y[:, :int(PROMPT_FRACTION * s)] = -100
        batches.append((x, y))
    return batches


def plain_loop(case: dict, mode: str, window_s: float, sampler: GPUSampler) -> dict:
    """Time the plain training loop of ``mode`` over a window of at least ``window_s``."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=case["vocab"], block_size=case["seq"], n_layer=case["n_layer"],
                    n_head=case["n_head"], d_model=case["d_model"], dropout=0.0)
    model = GPT(cfg).cuda()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    graphs = mode == "compile-reduce-overhead"
    forward = model if mode == "eager" else \
        torch.compile(model, mode="reduce-overhead" if graphs else None)
    batches = make_batches(case)

    def run(first: int, n: int) -> torch.Tensor:
        for i in range(first, first + n):
            x, y = batches[i % N_BATCHES]
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    run(0, WARMUP_STEPS)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(WARMUP_STEPS, ESTIMATE_STEPS)
    torch.cuda.synchronize()
    rate = ESTIMATE_STEPS / (time.perf_counter() - start)
    steps = max(ESTIMATE_STEPS, math.ceil(rate * window_s))
    sampler.drain()
    start = time.perf_counter()
    loss = run(WARMUP_STEPS + ESTIMATE_STEPS, steps)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    gpu = sampler.drain()
    final_loss = float(loss)
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"{mode}: loss {final_loss} after the timed window")
    return {"steps_s": steps / elapsed, "gpu_util": gpu.get("gpu_util"),
            "gpu_mem_gb": gpu.get("gpu_mem_gb"), "gpu_power_w": gpu.get("gpu_power_w"),
            "window_s": elapsed, "steps": steps, "warmup_steps": WARMUP_STEPS + ESTIMATE_STEPS,
            "loss": final_loss}


def run_command(cmd: List[str], timeout_s: float) -> dict:
    """Run ``cmd`` from the repository root in its own process group, killed on timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    result = {"args": cmd[1:], "returncode": proc.returncode,
              "wall_s": time.perf_counter() - start}
    if timed_out or proc.returncode != 0:
        result["error"] = f"timed out after {timeout_s} s" if timed_out else \
            f"exit status {proc.returncode}"
        result["stderr_tail"] = (err or out)[-3000:]
    return result


def train_records(path: Path) -> List[dict]:
    """The ``train`` records of a metrics.jsonl, skipping a torn last line."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train":
                records.append(record)
    return records


def summarise_windows(records: List[dict], seq: int) -> dict:
    """Median steps/s and mean utilisation of the log windows after the first."""
    if len(records) < 2:
        return {"error": f"{len(records)} train record(s): need two, the first is dropped"}
    kept = records[1:]
    rates = [r["steps_s"] for r in kept]
    utils = [r["gpu_util"] for r in kept if "gpu_util" in r]
    steps = [b["step"] - a["step"] for a, b in zip(records, kept)]
    durations = [n / r["steps_s"] for n, r in zip(steps, kept)]
    last = kept[-1]
    summary = {"steps_s": statistics.median(rates),
               "gpu_util": statistics.mean(utils) if utils else None,
               "window_s": statistics.median(durations), "steps": sum(steps),
               "windows": len(kept), "steps_s_windows": rates, "gpu_util_windows": utils,
               "seq_len": round(last["tok_s"] / last["samples_s"]) if "tok_s" in last else None}
    warnings = []
    if summary["window_s"] < MIN_WINDOW_S:
        warnings.append(f"log windows last {summary['window_s']:.2f} s: raise log.every")
    if summary["seq_len"] is not None and summary["seq_len"] != seq:
        warnings.append(f"trainer sequence length {summary['seq_len']}, case {seq}")
    if warnings:
        summary["warnings"] = warnings
    return summary


def fastlab_run(case: dict, graphs: bool, log_every: int, windows: int, out_dir: Path,
                name: str, timeout_s: float) -> dict:
    """One ``python -m fastlab.train`` run of ``case``, summarised from its log windows."""
    cmd = [sys.executable, "-m", "fastlab.train", *case["fastlab_args"],
           f"train.cuda_graphs={str(graphs).lower()}", f"train.steps={log_every * windows}",
           f"log.every={log_every}", *NO_EVAL_OR_CHECKPOINT, "log.progress=false",
           f"log.out_dir={out_dir}", f"log.name={name}"]
    result = run_command(cmd, timeout_s)
    if "error" in result:
        return result
    metrics = out_dir / name / "metrics.jsonl"
    if not metrics.exists():
        return {**result, "error": f"no {metrics}"}
    return {**result, "log_every": log_every, **summarise_windows(train_records(metrics),
                                                                  case["seq"])}


def packed_sweep(case: dict, log_every: int, windows: int, out_dir: Path, timeout_s: float,
                 single_steps_s: Optional[float]) -> dict:
    """``PACKED_RUNS`` seeds of ``case`` side by side on the GPU, against one run alone."""
    seeds = ",".join(str(s) for s in range(PACKED_RUNS))
    cmd = [sys.executable, "-m", "fastlab.sweep", *case["fastlab_args"], f"train.seed={seeds}",
           "train.cuda_graphs=true", f"train.steps={log_every * windows}",
           f"log.every={log_every}", *NO_EVAL_OR_CHECKPOINT, f"log.out_dir={out_dir}",
           "log.name=packed", "--parallel", str(PACKED_RUNS)]
    result = run_command(cmd, timeout_s)
    sweep_dir = out_dir / "packed"
    listed = sweep_dir / "results.json"
    if listed.exists():
        result["returncodes"] = [{"config": r.get("config"), "returncode": r.get("returncode")}
                                 for r in json.loads(listed.read_text())]
    names = sorted({p.parent.name for p in sweep_dir.glob("*/metrics.jsonl")} |
                   {p.stem for p in sweep_dir.glob("*.log")})
    runs = {}
    for name in names:
        metrics = sweep_dir / name / "metrics.jsonl"
        runs[name] = summarise_windows(train_records(metrics), case["seq"]) \
            if metrics.exists() else {"error": "no metrics.jsonl"}
        log = sweep_dir / f"{name}.log"
        if "error" in runs[name] and log.exists():
            runs[name]["log_tail"] = log.read_text()[-3000:]
    ok = [r for r in runs.values() if "steps_s" in r]
    utils = [u for r in ok for u in r["gpu_util_windows"]]
    aggregate = sum(r["steps_s"] for r in ok) if ok else None
    result.update({"log_every": log_every, "runs": runs, "runs_measured": len(ok),
                   "aggregate_steps_s": aggregate, "single_steps_s": single_steps_s,
                   "aggregate_over_single": aggregate / single_steps_s
                   if aggregate and single_steps_s else None,
                   "gpu_util": statistics.mean(utils) if utils else None})
    if len(ok) < PACKED_RUNS:
        result.setdefault("error", f"{len(ok)} of {PACKED_RUNS} runs measured")
    return result


def ratios(providers: Dict[str, dict]) -> Dict[str, float]:
    """steps/s of each fastlab provider over each later provider, both measured."""
    names = [p for p in PROVIDERS if providers.get(p, {}).get("steps_s")]
    return {f"{a}/{b}": providers[a]["steps_s"] / providers[b]["steps_s"]
            for a, b in itertools.combinations(names, 2) if a in FASTLAB}


def environment() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain")
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status)}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    print(f"\n{report['gpu']}  torch {report['torch']}  commit {report['git_commit']}")
    print(f"{'case':<8} {'provider':<24} {'steps/s':>9} {'gpu %':>6} {'window s':>9} "
          f"{'steps':>7}")
    for case, entry in report["cases"].items():
        for name, r in entry["providers"].items():
            if "error" in r:
                print(f"{case:<8} {name:<24} error: {r['error']}")
                continue
            print(f"{case:<8} {name:<24} {r['steps_s']:>9.1f} {_fmt(r['gpu_util'], '>6.1f')} "
                  f"{r['window_s']:>9.2f} {r['steps']:>7}")
        for pair, value in entry["ratios"].items():
            print(f"{case:<8} {pair}: {value:.2f}x")
    packed = report.get("packed")
    if packed:
        print(f"packed   {packed['runs_measured']} runs: aggregate "
              f"{_fmt(packed['aggregate_steps_s'], '.1f')} steps/s, "
              f"{_fmt(packed['aggregate_over_single'], '.2f')}x one run alone, gpu "
              f"{_fmt(packed['gpu_util'], '.1f')}%" +
              (f"  error: {packed['error']}" if "error" in packed else ""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--skip-packed", action="store_true", help="no packed sweep")
    p.add_argument("--window-s", type=float, default=4.0,
                   help="least duration of a plain loop's timed window")
    p.add_argument("--windows", type=int, default=6,
                   help="log windows per fastlab run (train.steps = windows x log.every)")
    p.add_argument("--graphs-log-every", type=int, default=8000,
                   help="log.every of fastlab-graphs (1000-3000 steps/s expected)")
    p.add_argument("--no-graphs-log-every", type=int, default=800,
                   help="log.every of fastlab-no-graphs (100-300 steps/s expected)")
    p.add_argument("--packed-log-every", type=int, default=4000,
                   help="log.every of each packed run (the GPU is shared four ways)")
    p.add_argument("--timeout-s", type=float, default=1200, help="limit of each subprocess")
    p.add_argument("--run-dir", type=Path,
                   help="keep the fastlab runs here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.windows < 2:
        p.error("--windows must be >= 2: the first window is dropped")
    return args


def bench(args: argparse.Namespace, run_dir: Path) -> dict:
    sampler = GPUSampler(torch.device("cuda"), period_s=0.1)
    log_every = {"fastlab-graphs": args.graphs_log_every,
                 "fastlab-no-graphs": args.no_graphs_log_every}
    report = {**environment(), "settings": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(args).items()}, "cases": {}}
    try:
        for case_name in args.cases:
            case = CASES[case_name]
            shape = {k: v for k, v in case.items() if k != "fastlab_args"}
            entry = {"shape": shape, "fastlab_args": case["fastlab_args"], "providers": {}}
            report["cases"][case_name] = entry
            for name in (p for p in PROVIDERS if p in args.providers):
                print(f"{case_name} {name} ...", flush=True)
                if name in FASTLAB:
                    torch.cuda.empty_cache()
                    result = fastlab_run(case, FASTLAB[name], log_every[name], args.windows,
                                         run_dir, f"{case_name}-{name}", args.timeout_s)
                else:
                    try:
                        result = plain_loop(case, name, args.window_s, sampler)
                    except Exception as exc:
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                    torch.compiler.reset()
                    torch.cuda.empty_cache()
                entry["providers"][name] = result
                entry["ratios"] = ratios(entry["providers"])
                write_json(args.out, report)
        if not args.skip_packed:
            print("packed sweep ...", flush=True)
            single = report["cases"].get("default", {}).get("providers", {}) \
                .get("fastlab-graphs", {}).get("steps_s")
            if single is None:
                alone = fastlab_run(CASES["default"], True, args.packed_log_every,
                                    args.windows, run_dir, "packed-single", args.timeout_s)
                report["packed_single"] = alone
                single = alone.get("steps_s")
            report["packed"] = packed_sweep(CASES["default"], args.packed_log_every,
                                            args.windows, run_dir, args.timeout_s, single)
            write_json(args.out, report)
    finally:
        sampler.close()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("train_throughput: no CUDA device; this bench measures GPU training",
              file=sys.stderr)
        return 2
    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        report = bench(args, args.run_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
            report = bench(args, Path(tmp))
    print_table(report)
    print(f"wrote {args.out}")
    failed = [r for e in report["cases"].values() for r in e["providers"].values()
              if "error" in r] + [r for r in [report.get("packed")] if r and "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
