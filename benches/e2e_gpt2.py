"""GPT-2 end to end: ``python -m fastlab.train`` against a nanoGPT-style loop, same data.

    python3 benches/e2e_gpt2.py --out OUT_DIR [--steps 200] [--profile]

Both sides train the same GPT-2 (``configs/gpt2.toml``: 124M, batch 16 x 1024, bf16) from
the same initial weights on the same batches (the ``lm`` task's synthetic stream, drawn
from (seed, step) on the GPU), with the same optimizer settings and schedule:

* ``nanogpt``: a loop written here the way nanoGPT's train.py runs: its model layout
  (fused qkv projection, ``F.scaled_dot_product_attention(is_causal=True)``, tied head,
  full logits and ``F.cross_entropy``), ``torch.compile(model)``, bf16 autocast,
  ``clip_grad_norm_`` and torch's fused AdamW, the lr set on the host every step. Its
  batches come from the task on the GPU (cheaper than nanoGPT's host memmap loader), drawn
  from a device step counter: nothing in its step waits on the GPU, so the host queues
  ahead as nanoGPT's does. ``--loop-host-step`` adds a run of the loop that uploads the
  step from the host instead (``torch.tensor(step, device=...)``, a pageable copy that
  waits for the GPU every step), how this bench drove the loop before.
* ``fastlab``: the trainer itself, in-process, with the config file and the same steps.

Each variant runs in its own subprocess (a clean allocator and compiler cache). Reported:
tokens/s (median over log windows after the first two, which hold compilation and graph
capture), peak allocated memory (``torch.cuda.max_memory_allocated`` over training), MFU
against the bf16 matmul rate measured here (an 8192^3 ``torch.mm``) and against the
datasheet peak, NVML utilisation, and the per-window mean losses of both, with their
largest relative difference. ``--profile`` adds a torch.profiler trace of steps of each
side (eager steps for the trainer: its CUDA graph hides nothing from the kernels' times)
and a table of GPU kernel time per step by category.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = str(ROOT / "configs" / "gpt2.toml")
#: the relative difference of window losses accepted as "tracking" (bf16 rounding diverges
#: two runs from the same start slowly; 200 steps stay well inside this)
LOSS_TOLERANCE = 0.02
#: kernel-name patterns, first match wins: the categories of the profile table
CATEGORIES = [
    ("attention", r"attn|attention|flash|fmha|sdpa|^_fwd_kernel|^_bwd_dkdv|^_bwd_dq"),
    ("cross_entropy", r"cross_entropy|_ce_|nll_loss|log_softmax|logsumexp|flce"),
    ("optimizer", r"adam|multi_tensor|foreach|_clip|grad_norm|l2norm|sqnorm"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90|wgmma|cublas|matmul|_mm_|splitk"),
    ("layernorm", r"layer_norm|layernorm"),
    ("elementwise", r"triton_|elementwise|vectorized|reduce|copy|fill|cat|index"),
]


#: how many of the longest kernels the profile table lists
TOP_KERNELS = 40


def overrides(args, run_dir: str, name: str, extra=()) -> List[str]:
    return [f"train.steps={args.steps}", f"optim.warmup_steps={args.warmup}",
            f"train.batch_size={args.batch}", f"task.seq_len={args.seq}",
            f"model.preset={args.preset}", f"log.every={args.log_every}",
            f"eval.every={args.steps}", "eval.samples=8", f"checkpoint.every={args.steps}",
            f"log.out_dir={run_dir}", f"log.name={name}", "log.progress=false",
            f"train.seed={args.seed}", *extra]


# --- the nanoGPT-style loop ----------------------------------------------------------------
class NanoBlock(torch.nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        nn = torch.nn
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.gelu = nn.GELU()

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(torch.nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        nn = torch.nn
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(NanoBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                 targets.view(-1))

    @torch.no_grad()
    def load_from_fastlab(self, gpt) -> None:
        """Copy a fastlab GPT's weights (same layout, q and kv projections concatenated)."""
        self.wte.weight.copy_(gpt.tok_emb.weight)
        self.wpe.weight.copy_(gpt.pos_emb.weight)
        self.ln_f.load_state_dict(gpt.ln_f.state_dict())
        for mine, theirs in zip(self.h, gpt.blocks):
            mine.ln_1.load_state_dict(theirs.ln1.state_dict())
            mine.ln_2.load_state_dict(theirs.ln2.state_dict())
            a = theirs.attn
            mine.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.kv_proj.weight]))
            mine.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.kv_proj.bias]))
            mine.c_proj.load_state_dict(a.out_proj.state_dict())
            mine.c_fc.load_state_dict(theirs.mlp[0].state_dict())
            mine.mlp_proj.load_state_dict(theirs.mlp[2].state_dict())


def run_nanogpt(args) -> Dict:
    from fastlab.optim.schedules import lr_multiplier
    from fastlab.tasks import build_task
    from fastlab.train.config import build_config
    from fastlab.train.environment import seed_everything
    from fastlab.train.telemetry import GPUSampler

    cfg = build_config(CONFIG, overrides(args, "/nonexistent", "nanogpt"))
    device = torch.device("cuda")
    seed_everything(cfg.train.seed, device)
    task = build_task(cfg.task)
    reference = task.build_model(cfg.model)  # the trainer's initial weights, same seed
    m = cfg.model
    model = NanoGPT(task.vocab_size, cfg.task.seq_len, m.n_layer, m.n_head, m.d_model)
    model.load_from_fastlab(reference)
    del reference
    model.to(device)
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            eps=cfg.optim.eps, fused=True)
    lr_at = lr_multiplier(cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps,
                          cfg.optim.min_lr_ratio)
    compiled = torch.compile(model)
    losses = torch.zeros(args.steps, device=device)
    marks = []
    sampler = GPUSampler(device)
    step_t = torch.zeros((), dtype=torch.int64, device=device)
    host_step = args.fastlab_args == "host_step"
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        if step % args.log_every == 0:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
            if step == 2 * args.log_every:
                sampler.drain()
        lr = cfg.optim.lr * float(lr_at(torch.tensor(step)))
        for g in opt.param_groups:
            g["lr"] = lr
        if host_step:  # a pageable upload: the host waits for the GPU here
            step_t = torch.tensor(step, device=device)
        losses[step] = nano_step(compiled, opt, params, task, cfg, device, step_t,
                                 cfg.train.seed)
        step_t.add_(1)
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    marks.append(end)
    torch.cuda.synchronize()
    nvml = sampler.drain()
    peak = torch.cuda.max_memory_allocated() / 1e9
    windows = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    tokens = cfg.train.batch_size * cfg.task.seq_len
    tok_s = [args.log_every * tokens / w for w in windows]
    per_window = losses.view(-1, args.log_every).double().mean(1).tolist()
    result = {"tok_s_windows": tok_s, "losses": per_window, "peak_gb": peak,
              "gpu_util": nvml.get("gpu_util")}
    if args.profile and not host_step:
        result["profile"] = profile_nanogpt(compiled, opt, params, task, cfg, device, args)
    return result


def nano_step(compiled, opt, params, task, cfg, device, step: torch.Tensor, seed: int):
    """One step of the loop, nanoGPT's way, on the batch of device counter ``step``; the
    loss (a device tensor: no sync)."""
    batch = task.batch(step, cfg.train.batch_size, device, seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(batch["inputs"], batch["targets"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def profile_nanogpt(compiled, opt, params, task, cfg, device, args) -> Dict:
    from torch.profiler import ProfilerActivity, profile

    step_t = torch.zeros((), dtype=torch.int64, device=device)

    def step(i):
        nano_step(compiled, opt, params, task, cfg, device, step_t, 1)
        step_t.add_(1)

    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            step(i)
        torch.cuda.synchronize()
    path = os.path.join(args.trace_dir, "nanogpt.trace.json")
    prof.export_chrome_trace(path)
    return kernel_table(path, 5)


# --- fastlab's trainer ---------------------------------------------------------------------
def train_records(path: str) -> List[dict]:
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def run_fastlab(args) -> Dict:
    from fastlab.train.config import build_config
    from fastlab.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        extra = [kv for kv in args.fastlab_args.split(",") if kv]
        cfg = build_config(CONFIG, overrides(args, tmp, "fastlab", extra))
        train(cfg)
        records = train_records(os.path.join(tmp, "fastlab", "metrics.jsonl"))
        result = {}
        # eager steps (each kernel's time) and the captured step's replays (the gaps too)
        for key, graphs in (("profile", "off"), ("profile_graph", "on")) if (
                args.profile and not extra) else ():
            name = f"profile-{graphs}"
            prof_cfg = build_config(CONFIG, overrides(args, tmp, name, (
                "train.steps=14", f"train.cuda_graphs={graphs}", "log.profile=true",
                "eval.every=100", "checkpoint.every=100")))
            train(prof_cfg)
            traces = sorted(Path(tmp, name, "profile").glob("*.json"))
            if traces:
                dest = os.path.join(args.trace_dir, f"fastlab-graphs-{graphs}.trace.json")
                os.replace(traces[-1], dest)
                result[key] = kernel_table(dest, 5)
            else:
                result[key] = {"error": "the trainer wrote no trace"}
    train_rows = [r for r in records if r.get("kind") == "train"]
    result.update({
        "tok_s_windows": [r["tok_s"] for r in train_rows],
        "losses": [r["loss"] for r in train_rows],
        "peak_gb": max(r.get("mem_peak_gb", 0.0) for r in train_rows),
        "gpu_util": statistics.mean([r["gpu_util"] for r in train_rows[2:] if "gpu_util" in r]
                                    or [float("nan")]),
        "final_eval": [r for r in records if r.get("kind") == "eval"][-1:],
    })
    return result


# --- profile tables -----------------------------------------------------------------------
def kernel_table(trace_path: str, steps: int) -> Dict:
    """GPU kernel time per step (ms) by category, the longest kernels (ms per step and
    launches per step), and the GPU's span per step (first kernel start to last kernel end,
    over ``steps``): span minus kernel time is the time between kernels."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    by_cat, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    first, last = math.inf, -math.inf
    for ev in events:
        if ev.get("cat") != "kernel":
            continue
        first, last = min(first, ev["ts"]), max(last, ev["ts"] + ev.get("dur", 0))
        name, dur = ev["name"], ev.get("dur", 0) / 1e3 / steps
        cat = next((c for c, pat in CATEGORIES if re.search(pat, name.lower())), "other")
        by_cat[cat] += dur
        by_name[name[:90]] += dur
        count[name[:90]] += 1
    top = [(name, ms, count[name] / steps)
           for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]]
    return {"ms_per_step": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "kernel_ms_total": sum(by_cat.values()), "top_kernels": top,
            "span_ms_per_step": (last - first) / 1e3 / steps if count else 0.0,
            "launches_per_step": sum(count.values()) / steps}


# --- the parent: both variants, the matmul rate, the summary ------------------------------
def matmul_tflops() -> float:
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: torch.mm(a, b), warmup=100, rep=500)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def summarise(name: str, raw: Dict, flops_per_token: float, mm_peak: float,
              sheet_peak: float) -> Dict:
    kept = raw["tok_s_windows"][2:]
    tok_s = statistics.median(kept)
    return {"variant": name, "tok_s": tok_s, "tok_s_windows": raw["tok_s_windows"],
            "peak_gb": raw["peak_gb"], "gpu_util": raw.get("gpu_util"),
            "mfu_measured_peak": tok_s * flops_per_token / (mm_peak * 1e12),
            "mfu_datasheet": tok_s * flops_per_token / sheet_peak,
            "losses": raw["losses"], "profile": raw.get("profile"),
            "profile_graph": raw.get("profile_graph"),
            "final_eval": raw.get("final_eval")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for e2e_gpt2.json, traces and plots")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="lr warm-up steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--trace-dir", help="where the profiles' traces go (default: --out)")
    p.add_argument("--also", action="append", default=[], metavar="LABEL:KEY=VALUE[,...]",
                   help="one more trainer run, fastlab-LABEL, with these options (e.g. "
                        "autotune:train.compile=max-autotune); repeatable, not profiled")
    p.add_argument("--loop-host-step", action="store_true",
                   help="also run the loop with the step uploaded from the host every step "
                        "(a sync per step), as nanogpt-hoststep")
    p.add_argument("--fastlab-args", default="", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=("nanogpt", "fastlab"), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps % args.log_every or args.steps < 4 * args.log_every:
        p.error(f"--steps must be a multiple of --log-every and at least 4 windows, got "
                f"{args.steps} and {args.log_every}")
    if not torch.cuda.is_available():
        p.error("this bench needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    args.trace_dir = args.trace_dir or args.out
    os.makedirs(args.trace_dir, exist_ok=True)
    if args.variant:
        run = run_nanogpt if args.variant == "nanogpt" else run_fastlab
        with open(args.json, "w") as f:
            json.dump(run(args), f)
        return

    from fastlab.models.gpt import GPT, GPTConfig
    from fastlab.train.config import build_config
    from fastlab.train.telemetry import peak_flops
    import triton

    cfg = build_config(CONFIG, overrides(args, "/nonexistent", "x"))
    m = cfg.model
    gpt = GPT(GPTConfig(vocab_size=cfg.task.vocab_size, block_size=args.seq, n_layer=m.n_layer,
                        n_head=m.n_head, d_model=m.d_model, bias=m.bias, init=m.init))
    flops_per_token = gpt.flops_per_token(args.seq)
    n_params = gpt.num_params()
    del gpt
    mm = matmul_tflops()
    sheet = peak_flops(torch.device("cuda"), "bf16") or float("nan")
    results = {}
    out = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "cuda": torch.version.cuda},
           "shape": {"preset": args.preset, "params_non_embedding": n_params,
                     "batch": args.batch, "seq": args.seq, "steps": args.steps,
                     "vocab": cfg.task.vocab_size, "flops_per_token": flops_per_token},
           "matmul_tflops_measured": mm, "datasheet_tflops": sheet / 1e12,
           "loss_tolerance": LOSS_TOLERANCE, "variants": results}
    runs = [("nanogpt", "nanogpt", ""), ("fastlab", "fastlab", "")]
    if args.loop_host_step:
        runs.insert(1, ("nanogpt-hoststep", "nanogpt", "host_step"))
    for spec in args.also:
        label, _, options = spec.partition(":")
        if not label or "=" not in options:
            p.error(f"--also expects LABEL:KEY=VALUE[,...], got {spec!r}")
        runs.append((f"fastlab-{label}", "fastlab", options))
    own, argv = [], iter(sys.argv[1:])
    for a in argv:  # this run's own arguments, less the --also runs
        if a == "--also":
            next(argv, None)
        elif not a.startswith("--also="):
            own.append(a)
    for name, variant, options in runs:
        path = os.path.join(args.out, f"e2e_{name}.raw.json")
        cmd = [sys.executable, __file__, *own, "--variant", variant, "--json", path,
               "--fastlab-args", options]
        t0 = time.time()
        rc = subprocess.run(cmd, cwd=str(ROOT)).returncode
        print(f"{name}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            results[name] = {"variant": name, "error": f"exit {rc}"}
            continue
        with open(path) as f:
            results[name] = summarise(name, json.load(f), flops_per_token, mm, sheet)
        os.remove(path)
        write_results(args.out, out)  # after each variant: a later one may not finish
    nano, fl = results.get("nanogpt", {}), results.get("fastlab", {})
    if "tok_s" in nano and "tok_s" in fl:
        diffs = [abs(a - b) / abs(a) for a, b in zip(nano["losses"], fl["losses"])]
        out["ratios"] = {"tok_s": fl["tok_s"] / nano["tok_s"],
                         "peak_memory": fl["peak_gb"] / nano["peak_gb"],
                         "max_rel_loss_diff": max(diffs),
                         "losses_track": max(diffs) <= LOSS_TOLERANCE}
        print(json.dumps(out["ratios"], indent=1))
    write_results(args.out, out)


def write_results(folder: str, out: Dict) -> None:
    path = os.path.join(folder, "e2e_gpt2.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
