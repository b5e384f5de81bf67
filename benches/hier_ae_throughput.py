"""hier_ae training throughput: ragged units against the same model with every unit padded
to its level's maximum length.

    python3 benches/hier_ae_throughput.py OUT.json                      # GPU, configs/hier_ae.toml
    python3 benches/hier_ae_throughput.py OUT.json --device cpu --tiny  # a check on a CPU

Variants, one model (the same weights, from one seed) and the same batches (the task's
batches of steps 0, 1, ...):

* ``ragged``: the task's own path, bytes packed back to back within the byte and word
  budgets (:func:`fastlab.tasks.hier_ae.ragged_hierarchy`), attention ``banded``;
* ``ragged-varlen``: the same with ``fastlab.ops.attention_varlen`` inside units;
* ``padded``: every word padded to ``sequence_lengths[0]`` bytes and every sentence to
  ``sequence_lengths[1]`` words (:func:`fastlab.tasks.hier_ae.padded_hierarchy`), torch's
  scaled_dot_product_attention with boolean masks.

Each step is the whole training step: batch, packing, forward and loss, backward, fastlab's
AdamW; under bf16 autocast (``--precision``). After ``--warmup`` steps, ``--steps`` steps
are timed one by one, each between two synchronisations (CUDA events on a GPU, the host
clock on a CPU), so no step overlaps the next in either variant: the median and 20/80
percentiles of step time, tokens/s (real bytes of the kept sentences per second, the same
text for every variant), the rows each level computes, and peak GPU memory
(``torch.cuda.max_memory_allocated`` over the variant's steps).

Before timing, the loss of the first batch is computed by every variant in fp32 and
eval mode (no dropout): they must agree (``loss_check``); a variant that disagrees by more
than ``LOSS_RTOL`` is reported and the script exits 1.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastlab.optim import AdamW  # noqa: E402
from fastlab.tasks.hier_ae import (HierarchicalAutoencoder, padded_hierarchy,  # noqa: E402
                                   ragged_hierarchy)
from fastlab.train.config import build_config  # noqa: E402

VARIANTS = ("ragged", "ragged-varlen", "padded")
#: relative agreement of the variants' fp32 losses on one batch (summation order differs)
LOSS_RTOL = 1e-4
#: a CPU-sized model for --tiny: three levels, narrow widths
TINY = ["task.sequence_lengths=16,16,2", "task.vector_sizes=16,24,32,32",
        "task.corpus_paragraphs=200", "model.n_layer=1", "train.batch_size=8"]


def _hierarchy(task: HierarchicalAutoencoder, variant: str, batch):
    """(hierarchy, kept sentences) of ``batch`` in the layout of ``variant``."""
    if variant == "padded":
        kept = torch.ones(batch["bytes"].shape[0], dtype=torch.bool,
                          device=batch["bytes"].device)
        return padded_hierarchy(batch, task.lengths), kept
    attention = "varlen" if variant == "ragged-varlen" else "banded"
    return ragged_hierarchy(batch, task.lengths, task.cfg.chars_per_sentence,
                            task.cfg.words_per_sentence, attention)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_check(task, model, variants: List[str], batch_size: int, device) -> Dict[str, object]:
    """fp32 eval-mode loss of the first batch in every variant."""
    model.eval()
    batch = task.batch(torch.tensor(0, device=device), batch_size, device, 0)
    with torch.no_grad():
        losses = {}
        for variant in variants:
            hierarchy, kept = _hierarchy(task, variant, batch)
            out = task.reduce(model(hierarchy), kept)
            losses[variant] = float(out.total / out.count)
    model.train()
    reference = losses[variants[0]]
    worst = max(abs(v - reference) / max(abs(reference), 1e-12) for v in losses.values())
    return {"losses": losses, "max_rel_diff": worst, "ok": worst <= LOSS_RTOL}


def measure(task, model, variant: str, args, device) -> Dict[str, object]:
    """Time ``args.steps`` training steps of ``variant`` after ``args.warmup``."""
    optimizer = AdamW(model.parameters(), lr=1e-3)
    autocast = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    batch_size = args.batch_size

    def step(i: int):
        batch = task.batch(torch.tensor(i, device=device), batch_size, device, 0)
        hierarchy, kept = _hierarchy(task, variant, batch)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = task.reduce(model(hierarchy), kept)
        (out.total / out.count.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out, hierarchy

    for i in range(args.warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens = [], 0
    for i in range(args.warmup, args.warmup + args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            last, hierarchy = step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            last, hierarchy = step(i)
            times.append(time.perf_counter() - t0)
        # real bytes of the step's kept sentences: the same text for every variant (padded
        # keeps all, ragged those within its budgets); a host sync outside the timing
        tokens += int(hierarchy.levels[0].real.sum())
    quantiles = statistics.quantiles(times, n=5) if len(times) >= 2 else times * 4
    return {
        "step_s_median": statistics.median(times), "step_s_p20": quantiles[0],
        "step_s_p80": quantiles[-1],
        "tokens_s": tokens / sum(times),
        "sentences_s": batch_size * len(times) / sum(times),
        "rows_per_level": [u.rows for u in hierarchy.levels] + [hierarchy.top_rows],
        "real_rows_per_level": [int(u.real.sum()) for u in hierarchy.levels],
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                              if device.type == "cuda" else None),
        "final_loss": float(last.total.detach() / last.count.clamp(min=1)),
        "finite": bool(torch.isfinite(last.total)),
    }


def describe(device: torch.device) -> Dict[str, object]:
    import triton

    return {"device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("--config", default=str(ROOT / "configs" / "hier_ae.toml"),
                        help="the task and model preset (default: configs/hier_ae.toml)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model and batch")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="sentences a step (default: the config's train.batch_size)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--variants", default="ragged,padded",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of torch (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    device = torch.device(args.device)
    cfg = build_config(args.config, TINY if args.tiny else [])
    args.batch_size = args.batch_size or cfg.train.batch_size
    task = HierarchicalAutoencoder(cfg.task)
    torch.manual_seed(args.seed)
    initial = task.build_model(cfg.model).state_dict()

    def fresh_model():
        model = task.build_model(cfg.model)
        model.load_state_dict(initial)
        return model.to(device)

    check = loss_check(task, fresh_model(), variants, args.batch_size, device)
    print(f"loss check: {check['losses']} (max relative difference "
          f"{check['max_rel_diff']:.2e})")
    results = {}
    for variant in variants:
        results[variant] = measure(task, fresh_model(), variant, args, device)
        r = results[variant]
        memory = (f", peak {r['peak_memory_bytes'] / 2**20:.0f} MiB"
                  if r["peak_memory_bytes"] is not None else "")
        print(f"{variant:>14}: {1e3 * r['step_s_median']:.2f} ms/step (p20 "
              f"{1e3 * r['step_s_p20']:.2f}, p80 {1e3 * r['step_s_p80']:.2f}), "
              f"{r['tokens_s']:.0f} tokens/s{memory}; rows per level {r['rows_per_level']}")
    if "ragged" in results and "padded" in results:
        speedup = results["ragged"]["tokens_s"] / results["padded"]["tokens_s"]
        print(f"ragged / padded tokens/s: {speedup:.2f}x")
    record = {
        "bench": "hier_ae_throughput", "machine": describe(device),
        "unix": time.time(),
        "shapes": {"sequence_lengths": task.lengths,
                   "vector_sizes": list(task.cfg.model_config().vector_sizes),
                   "num_heads": list(task.cfg.model_config().num_heads),
                   "n_layer": cfg.model.n_layer, "batch_sentences": args.batch_size,
                   "chars_per_sentence": cfg.task.chars_per_sentence,
                   "words_per_sentence": cfg.task.words_per_sentence,
                   "tiny": args.tiny, "config": os.path.relpath(args.config, ROOT)},
        "settings": {"precision": args.precision, "steps": args.steps,
                     "warmup": args.warmup, "optimizer": "fastlab.optim.AdamW",
                     "seed": args.seed},
        "loss_check": check, "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if check["ok"] and all(r["finite"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
