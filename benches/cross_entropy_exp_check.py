"""The cross-entropy kernel with the hardware exp2 (the default for 16-bit logits) and with
the accurate exp, on CUDA: ``python benches/cross_entropy_exp_check.py [OUT.json]``.
Per case (bf16 logits, randn * 3, every 8th target ignored): the forward kernel's time
(it writes the gradient too; do_bench median), the largest and the mean relative error of
the row losses against float64 over every row, and how many gradient values differ
between the two paths (and by how much)."""
import json
import sys

import torch
import triton

from fastlab.kernels import cross_entropy as K

CASES = {"16384x128256": (16384, 128256), "8192x32768": (8192, 32768),
         "4096x4096": (4096, 4096)}


def exact_losses(x, t):
    rows = []
    for i in range(0, x.shape[0], 1024):
        xd, ti = x[i:i + 1024].double(), t[i:i + 1024]
        nll = torch.logsumexp(xd, 1) - xd.gather(1, ti.clamp(min=0)[:, None])[:, 0]
        rows.append(torch.where(ti == -100, torch.zeros_like(nll), nll))
    return torch.cat(rows)


def main() -> None:
    records = []
    for name, (N, V) in CASES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(N, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
        t = torch.randint(0, V, (N,), device="cuda", generator=g)
        t[::8] = -100
        scale = torch.tensor(1.0 / N, device="cuda")
        want = exact_losses(x, t)
        valid = t != -100
        grads = {}
        for fast in (True, False):
            cfg = dict(fast_exp=fast)
            grad = torch.empty_like(x)
            loss, _ = K.cross_entropy_forward(x, t, grad, scale, -100, 0.0, 0.0, config=cfg)
            err = ((loss.double() - want).abs() / want.abs().clamp_min(1e-30))[valid]
            ms = triton.testing.do_bench(
                lambda: K.cross_entropy_forward(x, t, grad, scale, -100, 0.0, 0.0, config=cfg),
                warmup=50, rep=500)
            grads[fast] = grad
            records.append(dict(case=name, N=N, V=V, fast_exp=fast, ms=ms,
                                loss_max_rel=err.max().item(), loss_mean_rel=err.mean().item(),
                                mean_loss_rel=abs(loss[valid].double().mean().item()
                                                  - want[valid].mean().item())
                                / want[valid].mean().item()))
            print(records[-1], flush=True)
        differ = grads[True] != grads[False]
        records[-2].update(grad_values_differing=differ.float().mean().item(),
                           grad_max_abs_diff=(grads[True].float() - grads[False].float())
                           .abs().max().item())
        print(name, "speed-up", records[-1]["ms"] / records[-2]["ms"], records[-2], flush=True)
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, dtype="bfloat16", records=records)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
