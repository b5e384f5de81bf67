"""Cross-entropy and fused linear cross-entropy, forward + backward, against their peers.

Cross-entropy cases (bf16 logits, 1/8 of the targets ignored): the floor reads the logits
and writes their gradient once, 2 * N * V * 2 bytes. Fused linear cross-entropy: the
floor is its three matmuls, 6 * N * H * V flops. Every provider is checked against a
float64 reference on a slice of rows before it is timed; ``peak_extra_mem_gb`` is what
one forward + backward allocates beyond its inputs (the gradients it returns included).
fastlab's fused linear CE records also carry the analytic peak of their mode and, in
low-memory mode, the weight gradient's error against the default's fp32 accumulation.
"""
import pytest
import torch
import torch.nn.functional as F

from benches._harness import cuda_graph
from benches.conftest import optional_import
from fastlab.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlab.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

CE_CASES = {"16384x128256": (16384, 128256), "8192x32768": (8192, 32768)}
#: Cases and providers also timed as a CUDA-graph replay (mode ``full-graph``). Liger's
#: cross-entropy fails to capture (an error inside the capture), and a failed capture
#: leaves the CUDA generator unusable for the rest of the process: it is not tried.
GRAPH_CASES = ("8192x32768",)
GRAPH_PROVIDERS = ("fastlab", "torch_compile")
FLCE_CASE = (16384, 4096, 128256)  # tokens, hidden, vocabulary
#: Rows checked against float64 before timing (all of them would need 17 GB in float64).
CHECK_ROWS = 256


def _targets(n, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    t[::8] = -100
    return t


def _ce_providers():
    """name -> f(logits, target) returning the mean loss (differentiable)."""
    return {
        "fastlab": lambda x, t: cross_entropy(x, t),
        "eager_fp32": lambda x, t: F.cross_entropy(x.float(), t),
        "eager_fp64": lambda x, t: F.cross_entropy(x.double(), t).float(),
        "torch_compile": torch.compile(lambda x, t: F.cross_entropy(x.float(), t),
                                       dynamic=False),
    }


def _liger_ce():
    module = optional_import("liger_kernel.transformers.cross_entropy")
    loss = module.LigerCrossEntropyLoss(ignore_index=-100)
    return lambda x, t: loss(x, t)


def _check_ce(fn, x, t, strict=True):
    """Loss and gradient of the first CHECK_ROWS rows against float64.

    fastlab must match; a peer that does not (liger returns the loss in the logits' dtype)
    is still timed, and its error goes into the record.
    """
    xs = x[:CHECK_ROWS].detach().clone().requires_grad_(True)
    ts = t[:CHECK_ROWS]
    # the reference first: some providers (liger, fastlab_inplace) overwrite the logits
    # with their gradient during the call
    x64 = xs.detach().double().requires_grad_(True)
    want = cross_entropy_ref(x64, ts)
    (gwant,) = torch.autograd.grad(want, x64)
    loss = fn(xs, ts)
    (g,) = torch.autograd.grad(loss, xs)
    errors = dict(loss_rel_err=float((loss.double() - want).abs() / want.abs()),
                  grad_max_abs_err=float((g.double() - gwant).abs().max()))
    if strict:
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.double(), gwant, rtol=2e-2, atol=1e-6)
    return errors


def _full_step(fn, x, t):
    def step():
        loss = fn(x, t)
        return torch.autograd.grad(loss, x)
    return step


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("provider", ["fastlab", "fastlab_inplace", "eager_fp32",
                                      "eager_fp64", "torch_compile", "liger"])
def test_cross_entropy(bench, case, provider):
    N, V = CE_CASES[case]
    x = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    t = _targets(N, V)
    floor_bytes = 2 * N * V * x.element_size()
    shape = dict(N=N, V=V, dtype="bfloat16")
    if provider == "liger":
        fn = _liger_ce()
    elif provider != "fastlab_inplace":
        fn = _ce_providers()[provider]
    if provider == "fastlab_inplace":
        # each call overwrites the logits with their gradient; later calls time the same
        # work on those values, and the gradient returned is the logits buffer itself
        shape.update(_check_ce(lambda a, b: cross_entropy(a * 1, b, inplace_backward=True),
                               x, t))

        def step():
            return torch.autograd.grad(cross_entropy(x, t, inplace_backward=True), x)
        bench.measure("cross_entropy", case, "full", provider, step,
                      floor_bytes=floor_bytes, shape=shape)
        return
    shape.update(_check_ce(fn, x, t, strict=provider == "fastlab"))
    bench.measure("cross_entropy", case, "full", provider, _full_step(fn, x, t),
                  floor_bytes=floor_bytes, shape=shape)
    if case in GRAPH_CASES and provider in GRAPH_PROVIDERS:
        # the step replayed from a CUDA graph: GPU time without the host's launch costs,
        # which decide the eager time of the smaller case
        replay = cuda_graph(_full_step(fn, x, t))
        bench.measure("cross_entropy", case, "full-graph", provider, replay,
                      floor_bytes=floor_bytes, shape=shape)
    with torch.no_grad():
        bench.measure("cross_entropy", case, "fwd", provider, lambda: fn(x, t),
                      floor_bytes=N * V * x.element_size(), shape=shape)


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("candidate", ["lanes", "lanes-l2", "lanes-l2x2"])
def test_cross_entropy_candidates(bench, candidate, case):
    """The op's forward + backward under each launch candidate of kernels/cross_entropy.py,
    recorded in mode ``full`` beside the default, Liger and torch.compile of
    :func:`test_cross_entropy` (``ratio_vs`` compares them when one run holds all). Each
    repetition takes fresh gradients (torch.autograd.grad: nothing accumulates)."""
    from fastlab.kernels.cross_entropy import launch_candidate

    N, V = CE_CASES[case]
    x = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    t = _targets(N, V)
    shape = dict(N=N, V=V, dtype="bfloat16", candidate=candidate)
    fn = _ce_providers()["fastlab"]

    def step():
        with launch_candidate(candidate):
            return _full_step(fn, x, t)()

    with launch_candidate(candidate):
        shape.update(_check_ce(fn, x, t))
    bench.measure("cross_entropy", case, "full", f"fastlab-{candidate}", step,
                  floor_bytes=2 * N * V * x.element_size(), shape=shape)


def _sweep_configs():
    """Launch configurations the sweep times: (name, config for cross_entropy_forward)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for block_kb, warps in ((16, 16), (8, 8), (32, 16), (32, 32), (64, 32)):
        # the large blocks over many warps: fewer rows in flight, so more of each row is
        # still in L2 when sweep 2 reads it again; persistent grids only for the first two
        for per_sm in (None, 4) if block_kb <= 16 else (None,):
            cfg = dict(single=False, block_v=block_kb * 512, warps=warps)
            if per_sm:
                cfg["programs"] = sms * per_sm
            out.append((f"stream-b{block_kb}k-w{warps}-p{per_sm or 'N'}", cfg))
    for warps in (8, 16, 32):
        out.append((f"single-w{warps}", dict(single=True, warps=warps)))
    return out


def _candidate_configs(V):
    """The launch candidates of kernels/cross_entropy.py as sweep configurations."""
    from fastlab.kernels.cross_entropy import CANDIDATES, launch_config

    return [(f"candidate-{name}", launch_config(V, 2, 1 << 30, name, torch.device("cuda")))
            for name in CANDIDATES]


@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_launch_sweep(bench, case):
    """The kernel alone (loss and gradient in one launch) under each launch configuration:
    the data behind ``launch_config``'s choices. Mode ``sweep``: not compared with peers."""
    from fastlab.kernels.cross_entropy import cross_entropy_forward, next_power_of_2

    N, V = CE_CASES[case]
    x = (torch.randn(N, V, device="cuda") * 3).to(torch.bfloat16)
    t = _targets(N, V)
    grad = torch.empty_like(x)
    scale = torch.ones((), device="cuda")
    with torch.no_grad():
        want = F.cross_entropy(x[:CHECK_ROWS].double(), t[:CHECK_ROWS], reduction="none")
    for name, cfg in _sweep_configs() + _candidate_configs(V):
        if cfg["single"]:
            if V * 2 > 65536:
                continue  # a row must fit one block
            cfg = dict(cfg, block_v=next_power_of_2(V))
        loss, _ = cross_entropy_forward(x, t, grad, scale, -100, 0.0, 0.0, config=cfg)
        got = loss[:CHECK_ROWS].double()
        torch.testing.assert_close(got, want.masked_fill(t[:CHECK_ROWS] == -100, 0.0),
                                   rtol=1e-4, atol=1e-5)
        bench.measure("cross_entropy", case, "sweep", f"kernel-{name}",
                      lambda: cross_entropy_forward(x, t, grad, scale, -100, 0.0, 0.0,
                                                    config=cfg),
                      floor_bytes=2 * N * V * 2, shape=dict(N=N, V=V, config=cfg),
                      warmup=10, rep=40)


def _flce_providers():
    def matmul_ce(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t)

    return {
        "eager": matmul_ce,
        "torch_compile": torch.compile(matmul_ce, dynamic=False),
    }


#: fastlab variants of the fused linear CE bench: name -> keyword arguments. The default
#: (fp32 weight-gradient accumulation, 4096-row chunks here) against 8192-row chunks (one
#: fewer pass over the fp32 accumulator, 1.05 GB more logits), and the low-memory mode at
#: its budget's 768 rows against 512 and 1024 rows (fewer, larger weight-gradient matmuls
#: against memory: analytic peaks 1.382, 1.316 and 1.448 GB).
FLCE_VARIANTS = {
    "fastlab": {},
    "fastlab-chunk8192": dict(chunk_size=8192),
    "fastlab-low-memory": dict(low_memory=True),
    "fastlab-low-memory-chunk512": dict(low_memory=True, chunk_size=512),
    "fastlab-low-memory-chunk1024": dict(low_memory=True, chunk_size=1024),
}


def _weight_grad_error(h, w, t, **options):
    """The weight gradient of ``options`` against the default's (fp32 accumulation): max
    error in units of its largest entry, and norm-wise."""
    (want,) = torch.autograd.grad(fused_linear_cross_entropy(h, w, t), w)
    (got,) = torch.autograd.grad(fused_linear_cross_entropy(h, w, t, **options), w)
    diff = got.float() - want.float()
    return dict(weight_grad_max_err_vs_fp32=float(diff.abs().max() / want.float().abs().max()),
                weight_grad_norm_err_vs_fp32=float(diff.norm() / want.float().norm()))


@pytest.mark.parametrize("provider", list(FLCE_VARIANTS) + ["torch_compile", "eager", "liger"])
def test_fused_linear_cross_entropy(bench, provider):
    from fastlab.ops.fused_linear_cross_entropy import peak_extra_bytes

    N, H, V = FLCE_CASE
    h = (torch.randn(N, H, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, H, device="cuda") * H ** -0.5).to(torch.bfloat16).requires_grad_(True)
    t = _targets(N, V, seed=1)
    shape = dict(N=N, H=H, V=V, dtype="bfloat16")
    if provider == "liger":
        module = optional_import("liger_kernel.transformers.fused_linear_cross_entropy")
        loss_fn = module.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        fn = lambda a, b, c: loss_fn(b, a, c)  # noqa: E731  (Liger takes the weight first)
    elif provider in FLCE_VARIANTS:
        options = FLCE_VARIANTS[provider]
        fn = lambda a, b, c: fused_linear_cross_entropy(a, b, c, **options)  # noqa: E731
        shape["options"] = dict(options)
        shape["analytic_peak_extra_gb"] = peak_extra_bytes(N, H, V, dtype=torch.bfloat16,
                                                           **options) / 1e9
        if options.get("low_memory"):
            shape.update(_weight_grad_error(h, w, t, **options))
    else:
        fn = _flce_providers()[provider]
    n = CHECK_ROWS
    loss = fn(h[:n], w, t[:n])
    want = cross_entropy_ref(h[:n].detach().double() @ w.detach().double().T, t[:n])
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=1e-3)

    def step():
        return torch.autograd.grad(fn(h, w, t), (h, w))

    # ~80 ms a step: the default 100 ms of repetitions would be one sample
    bench.measure("fused_linear_cross_entropy", f"{N}x{H}x{V}", "full", provider, step,
                  floor_flops=6 * N * H * V, shape=shape, warmup=250, rep=1200)
