"""Training step of a ~1B Llama-style transformers model: unpatched, fastlab-patched, Liger.

    python benches/bench_hf_llama.py --out benches/results/latest/hf_llama.json
    python benches/bench_hf_llama.py --tiny --out /tmp/hf_llama_tiny.json   # CPU check

The model is built from a config (Llama 3.2 1B's shape: hidden 2048, 16 layers, 32 query
heads over 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings; 1.24B parameters), no
weights are downloaded. Every variant starts from the same initial weights (same seed) and
trains on the same batches of random tokens: ``--pool`` batches cycled, so the loss falls
as the model memorises them and the curves have something to agree on. One step is
forward (labels = inputs, the model shifts them) + backward + AdamW step + zero_grad.

Variants, one after another in this process, in this order:
- ``unpatched``: transformers as configured (SDPA attention, logits then the loss);
- ``fastlab``: ``fastlab.integrations.patch(model)`` (its defaults: fused linear
  cross-entropy, fastlab attention, RMSNorm, SwiGLU and RoPE);
- ``liger``: ``liger_kernel.transformers.apply_liger_kernel_to_llama(model=model)`` (its
  defaults: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy). It runs last because Liger
  also replaces functions and classes of transformers' modeling_llama module for the whole
  process. Skipped, with the reason, when liger_kernel is not importable.

Reported per variant: the parts patched (``parts``: loss, attention, rms_norm, mlp, rope,
each true or false, read from what the patch reports) and the patch's change list, tokens/s (median, 20th and 80th percentile over the steps after
``--warmup``; each step timed with CUDA events, read once at the end so no step waits for
the host), peak memory (``torch.cuda.max_memory_allocated``, reset before the model is
built: weights, optimizer state and activations; and the part above what is allocated once
the model and optimizer exist), the loss of every step, and errors. The criteria of issue 24
are evaluated in the JSON under ``criteria``.
"""
import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run as a script from anywhere in the repo

FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
            tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
VARIANTS = ("unpatched", "fastlab", "liger")
#: Issue 24's bar: fastlab's tokens/s over unpatched, and its peak memory over Liger's.
MIN_SPEEDUP = 1.1
MAX_MEMORY_OVER_LIGER = 1.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pool", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("bf16", "autocast"), default="bf16",
                   help="bf16: bf16 weights and optimizer state; autocast: fp32 weights "
                        "under bf16 autocast (as the Trainer's bf16=True)")
    p.add_argument("--optimizer", choices=("torch", "fastlab"), default="torch",
                   help="AdamW of every variant: torch's (fused on CUDA) or fastlab.optim's")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--loss-rtol", type=float, default=2e-2,
                   help="largest relative gap of a step's loss to unpatched's that counts as "
                        "matching")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny config and shapes (seq 64, batch 2, 6 steps), on the CPU "
                        "without CUDA: checks that the script works")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in (("seq", 64), ("batch", 2), ("steps", 6), ("warmup", 2)):
            if p.get_default(name) == getattr(args, name):
                setattr(args, name, value)
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def build_config(args):
    from transformers import LlamaConfig

    shape = TINY if args.tiny else FULL
    return LlamaConfig(**shape, max_position_embeddings=max(args.seq, 2048),
                       attention_dropout=0.0, use_cache=False, pad_token_id=None,
                       bos_token_id=None, eos_token_id=None)


def make_batches(args, vocab, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
            for _ in range(args.pool)]


def build_model(args, config, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()


def build_optimizer(args, model, device):
    params = model.parameters()
    if args.optimizer == "fastlab":
        from fastlab.optim import AdamW

        return AdamW(params, lr=args.lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0,
                             fused=device.type == "cuda")


PARTS = ("loss", "attention", "rms_norm", "mlp", "rope")


def fastlab_parts(changes):
    """Which of :data:`PARTS` a fastlab patch's change list shows as done by fastlab."""
    done = [c for c in changes if "fastlab" in c.after and not c.after.startswith("kept")]
    targets = [c.target for c in done]
    return dict(loss="forward" in targets,
                attention="config._attn_implementation" in targets,
                rms_norm=any("RMSNorm.forward" in t for t in targets),
                mlp=any("swiglu" in c.after for c in done),
                rope=any("apply_rotary" in c.after for c in done))


def apply_variant(name, model):
    """Patch ``model`` for the variant; returns (what the patch reports, parts patched)."""
    if name == "fastlab":
        import fastlab.integrations

        changes = fastlab.integrations.patch(model)
        return [str(c) for c in changes], fastlab_parts(changes)
    if name == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
        return (["apply_liger_kernel_to_llama(model=model): rope, rms_norm, swiglu, "
                 "fused_linear_cross_entropy"],
                dict(loss=True, attention=False, rms_norm=True, mlp=True, rope=True))
    return [], dict.fromkeys(PARTS, False)


class Timer:
    """Per-step wall time: CUDA events read once at the end, or the host clock on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_variant(name, args, config, batches, device):
    record = dict(variant=name)
    model = optimizer = None
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model = build_model(args, config, device)
        record["changes"], record["parts"] = apply_variant(name, model)
        optimizer = build_optimizer(args, model, device)
        base = torch.cuda.memory_allocated() if cuda else None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=args.precision == "autocast")
        timer, losses = Timer(device), []
        timer.mark()
        for step in range(args.steps):
            ids = batches[step % len(batches)]
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
            timer.mark()
        seconds = timer.seconds()[args.warmup:]
        tokens = args.batch * args.seq
        rates = sorted(tokens / s for s in seconds)
        record.update(
            tokens_per_s=statistics.median(rates),
            tokens_per_s_p20=rates[int(0.2 * (len(rates) - 1))],
            tokens_per_s_p80=rates[int(0.8 * (len(rates) - 1))],
            step_ms_median=1e3 * statistics.median(seconds),
            losses=[float(v) for v in torch.stack(losses).cpu()],
        )
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            record.update(peak_memory_gb=peak / 1e9,
                          peak_above_model_and_optimizer_gb=(peak - base) / 1e9,
                          model_and_optimizer_gb=base / 1e9)
    except Exception as exc:  # one variant failing (OOM, an incompatible peer) keeps the rest
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=8)
    finally:
        del model, optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def loss_gap(losses, reference):
    """Largest |loss - reference| and its ratio to the reference's loss, over the steps."""
    gaps = [abs(a - b) for a, b in zip(losses, reference)]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, reference) if b]
    return dict(max_abs=max(gaps), max_rel=max(rel), mean_abs=statistics.fmean(gaps))


def criteria(results, args):
    """Issue 24's three checks, each None when a variant it needs did not run."""
    ok = {name: r for name, r in results.items() if "error" not in r and "skipped" not in r}
    out = {}
    base, fast, liger = ok.get("unpatched"), ok.get("fastlab"), ok.get("liger")
    if base and fast:
        speedup = fast["tokens_per_s"] / base["tokens_per_s"]
        out["speedup_vs_unpatched"] = dict(value=speedup, required=MIN_SPEEDUP,
                                           passed=speedup >= MIN_SPEEDUP)
        gap = loss_gap(fast["losses"], base["losses"])
        out["losses_match_unpatched"] = dict(gap, rtol=args.loss_rtol,
                                             passed=gap["max_rel"] <= args.loss_rtol)
    if liger and base:
        out["liger_loss_gap_to_unpatched"] = loss_gap(liger["losses"], base["losses"])
    if fast and liger and "peak_memory_gb" in fast and "peak_memory_gb" in liger:
        ratio = fast["peak_memory_gb"] / liger["peak_memory_gb"]
        out["peak_memory_vs_liger"] = dict(value=ratio, required_at_most=MAX_MEMORY_OVER_LIGER,
                                           passed=ratio <= MAX_MEMORY_OVER_LIGER)
    return out


def versions():
    found = dict(python=platform.python_version(), torch=torch.__version__,
                 cuda=torch.version.cuda)
    for module in ("triton", "transformers", "liger_kernel", "fastlab"):
        try:
            mod = __import__(module)
            found[module] = getattr(mod, "__version__", None)
        except ImportError:
            found[module] = None
    if found["liger_kernel"] is None:
        try:
            from importlib.metadata import version

            found["liger_kernel"] = version("liger-kernel")
        except Exception:
            pass
    return found


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("bench_hf_llama: the full-size bench needs a CUDA GPU (use --tiny on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    config = build_config(args)
    batches = make_batches(args, config.vocab_size, device)
    results = {}
    for name in args.variants.split(","):
        if name == "liger":
            try:
                import liger_kernel.transformers  # noqa: F401
            except Exception as exc:
                results[name] = dict(variant=name, skipped=f"liger_kernel not importable: "
                                                           f"{type(exc).__name__}: {exc}")
                print(f"{name}: skipped ({results[name]['skipped']})", flush=True)
                continue
        results[name] = record = run_variant(name, args, config, batches, device)
        if "error" in record:
            print(f"{name}: error {record['error']}", flush=True)
        else:
            memory = (f", peak {record['peak_memory_gb']:.2f} GB"
                      if "peak_memory_gb" in record else "")
            print(f"{name}: {record['tokens_per_s']:.0f} tokens/s{memory}, loss "
                  f"{record['losses'][0]:.4f} -> {record['losses'][-1]:.4f}", flush=True)
    n_params = sum(p.numel() for p in build_model(args, config, "meta").parameters())
    payload = dict(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        bench="bench_hf_llama",
        gpu=torch.cuda.get_device_name() if cuda else None,
        machine=dict(gpu=torch.cuda.get_device_name() if cuda else "cpu"),
        device=str(device),
        versions=versions(),
        shapes=dict(batch=args.batch, seq=args.seq, tokens_per_step=args.batch * args.seq,
                    params=n_params, config={k: getattr(config, k, None) for k in
                                             (TINY if args.tiny else FULL)}),
        options=dict(steps=args.steps, warmup=args.warmup, pool=args.pool, lr=args.lr,
                     seed=args.seed, precision=args.precision, optimizer=args.optimizer,
                     tiny=args.tiny),
        results=results,
        criteria=criteria(results, args),
    )
    print(json.dumps(payload["criteria"], indent=1), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return payload


if __name__ == "__main__":
    main()
