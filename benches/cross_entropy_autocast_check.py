"""Cross-entropy of autocast logits against float64, fastlab beside torch, on CUDA:
``python benches/cross_entropy_autocast_check.py``. Prints, per logits dtype and label
smoothing, the largest relative error of each provider's per-row loss (N 1031, H 256,
V 32768, every 4th target ignored)."""
import torch
import torch.nn.functional as F

from fastlab.ops import cross_entropy


def rel(a, b):
    return ((a.double() - b).abs() / b.abs().clamp_min(1e-9)).max().item()


def main() -> None:
    torch.manual_seed(0)
    n, h_dim, v = 1031, 256, 32768
    h = torch.randn(n, h_dim, device="cuda")
    w = torch.randn(v, h_dim, device="cuda") * 3 * h_dim ** -0.5
    t = torch.randint(0, v, (n,), device="cuda")
    t[::4] = -100
    for dtype in (torch.bfloat16, torch.float16):
        for ls in (0.0, 0.1):
            with torch.autocast("cuda", dtype=dtype):
                z = F.linear(h, w)
                theirs = F.cross_entropy(z, t, reduction="none", label_smoothing=ls)
                ours = cross_entropy(z, t, reduction="none", label_smoothing=ls)
            exact = F.cross_entropy(z.double(), t, reduction="none", label_smoothing=ls)
            print(f"{dtype} label_smoothing={ls}: torch {rel(theirs, exact):.2e}, "
                  f"fastlab {rel(ours, exact):.2e}")


if __name__ == "__main__":
    main()
