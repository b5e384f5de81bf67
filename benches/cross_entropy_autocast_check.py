"""Cross-entropy of autocast logits against float64, fastlab beside torch (CUDA): python
benches/cross_entropy_autocast_check.py. Prints the largest relative error of each per row."""
import torch, torch.nn.functional as F
from fastlab.ops import cross_entropy
from fastlab.ops import fused_linear_cross_entropy as flce
torch.manual_seed(0)
N, H, V = 1031, 256, 32768
h = torch.randn(N, H, device="cuda"); w = torch.randn(V, H, device="cuda") * 3 * H ** -0.5
t = torch.randint(0, V, (N,), device="cuda"); t[::4] = -100
for dt in (torch.float32, torch.bfloat16, torch.float16):
    z = F.linear(h.to(dt), w.to(dt))
    for ls in (0.0, 0.1):
        ref = F.cross_entropy(z.double(), t, reduction="none", label_smoothing=ls)
        got = cross_entropy(z, t, reduction="none", label_smoothing=ls)
        tor = F.cross_entropy(z.float(), t, reduction="none", label_smoothing=ls)
        print(dt, ls, "fastlab vs f64 max rel", ((got.double() - ref).abs() / ref.abs().clamp_min(1e-9)).max().item(),
              "torch-fp32 vs f64", ((tor.double() - ref).abs() / ref.abs().clamp_min(1e-9)).max().item())
        with torch.autocast("cuda", dtype=dt if dt != torch.float32 else torch.bfloat16):
            zz = F.linear(h, w)
            a = F.cross_entropy(zz, t, reduction="none", label_smoothing=ls)
            b = cross_entropy(zz, t, reduction="none", label_smoothing=ls)
        r = F.cross_entropy(zz.double(), t, reduction="none", label_smoothing=ls)
        print("   autocast", zz.dtype, a.dtype, "torch vs f64", ((a.double()-r).abs()/r.abs().clamp_min(1e-9)).max().item(), "fastlab vs f64", ((b.double()-r).abs()/r.abs().clamp_min(1e-9)).max().item())
