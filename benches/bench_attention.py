"""Attention: fastlab's flash kernels against SDPA's backends, FlexAttention and xformers.

Cases: the two training shapes of the targets (long sequences, D = 128 and 64, causal,
bf16) and the small-head shapes of the research logs in fp32 and bf16. Modes: ``fwd`` and
``full`` (forward + backward). TFLOP/s count the matmul flops a causal pass really needs:
4 * B * H * S^2 * D forward, 2.5 times that backward, halved for the causal mask.
Before a provider is timed, its output (and, in ``full``, its gradients) is checked against
the float32 reference on a slice of the batch and heads (rows are independent).

Packed cases (``test_attention_varlen``): ragged sequences in one (total, H, D) batch,
fastlab's varlen op against flash-attn's ``flash_attn_varlen_func`` and against SDPA on the
same sequences padded to the longest (the flops of the padding are not counted). Option
cases (``test_attention_options``): sliding window, softcap, ALiBi and dropout on the
first training shape, fastlab alone, each against the plain causal call of the same shape.
"""
from dataclasses import dataclass

import pytest
import torch

from benches._harness import cuda_graph
from benches.conftest import optional_import
from fastlab.ops.attention import attention, attention_ref, attention_varlen
from fastlab.testing import assert_close, randn

OP = "attention"


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = True

    @property
    def name(self) -> str:
        kind = "causal" if self.causal else "full"
        dtype = str(self.dtype).replace("torch.", "")
        return f"B{self.batch}-H{self.heads}-S{self.seq}-D{self.head_dim}-{kind}-{dtype}"

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seq ** 2 * self.head_dim
        fwd *= 0.5 if self.causal else 1.0
        return fwd if mode == "fwd" else 3.5 * fwd

    def floor_bytes(self, mode: str) -> float:
        tile = self.batch * self.heads * self.seq * self.head_dim * self.dtype.itemsize
        lse = self.batch * self.heads * self.seq * 4
        # fwd: Q, K, V in, O and LSE out; bwd adds Q, K, V, O, dO, LSE in, dQ, dK, dV out
        return 4 * tile + lse if mode == "fwd" else 12 * tile + 2 * lse


CASES = [
    Case(4, 16, 4096, 128, torch.bfloat16),
    Case(8, 16, 2048, 64, torch.bfloat16),
    Case(64, 4, 256, 16, torch.float32),
    Case(64, 4, 256, 16, torch.bfloat16),
    Case(1024, 8, 64, 4, torch.float32),
    Case(1024, 8, 64, 4, torch.bfloat16),
]
SMALL = 256  # sequences up to this also run SDPA's math backend, a real peer there
PROVIDERS = ["fastlab", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex",
             "xformers"]
#: ``-graph`` modes replay the call from a CUDA graph (short sequences only): small shapes
#: are launch-bound in eager mode, and the graph shows the kernels' own speed. The graph
#: holds GRAPH_CALLS calls in a row, timed per call, so its launch is not billed to one call.
MODES = ["fwd", "full", "fwd-graph", "full-graph"]
GRAPH_CALLS = 10
#: Heads and batch rows checked against the float32 reference (it materialises S x S).
CHECK_BATCH, CHECK_HEADS = 1, 2


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # one compiled graph per case and mode: the default limit of 8 would silently send
    # the later cases to eager flex_attention and time that instead
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(CASES))
    compiled = torch.compile(flex_attention, fullgraph=True)
    mask = None
    if case.causal:
        mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, case.seq, case.seq,
                                 device="cuda")

    def run(q, k, v, causal):
        return compiled(q, k, v, block_mask=mask)

    return run


def _xformers():
    xops = optional_import("xformers.ops")

    def run(q, k, v, causal):
        bias = xops.LowerTriangularMask() if causal else None
        # xformers takes (B, S, H, D); the views cost nothing, its output is viewed back
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)

    return run


def _provider(name: str, case: Case):
    if name == "fastlab":
        return lambda q, k, v, causal: attention(q, k, v, causal=causal)
    if name.startswith("sdpa-"):
        if name == "sdpa-math" and case.seq > SMALL:
            pytest.skip("sdpa-math materialises S x S scores: only timed on short sequences")
        backend = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                   "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}[name]
        return _sdpa(backend)
    if name == "flex":
        return _flex(case)
    return _xformers()


def _check(fn, q, k, v, grad_out, case: Case, mode: str) -> None:
    """The provider's output (and gradients) on a slice match the float32 reference."""
    sl = (slice(0, CHECK_BATCH), slice(0, CHECK_HEADS))
    ref_in = [x[sl].detach().float().requires_grad_() for x in (q, k, v)]
    want = attention_ref(*ref_in, causal=case.causal)
    # TF32 dots (fastlab and the fp32 peers) are 10-bit mantissa products
    scale = 5000.0 if case.dtype == torch.float32 else 2.0
    out = fn(q, k, v, case.causal)
    assert_close(out[sl], want, case.dtype, scale=scale, msg="output")
    if mode == "full":
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        exact = torch.autograd.grad(want, ref_in, grad_out[sl].float())
        for name, a, b in zip(("dq", "dk", "dv"), got, exact):
            assert_close(a[sl], b, case.dtype, scale=scale, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attention(bench, case, provider, mode):
    base_mode, graphed = mode.split("-")[0], mode.endswith("-graph")
    if graphed and case.seq > SMALL:
        pytest.skip("graph modes only for short sequences, where launches dominate")
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v = (randn(shape, case.dtype, "cuda", seed=s, requires_grad=base_mode == "full")
               for s in (1, 2, 3))
    grad_out = randn(shape, case.dtype, "cuda", seed=4)
    fn = _provider(provider, case)
    try:
        out = fn(q, k, v, case.causal)
        if base_mode == "full":
            torch.autograd.grad(out, (q, k, v), grad_out)
    except Exception as exc:  # a peer refusing this dtype, head dim or shape
        if provider == "fastlab":
            raise
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        pytest.skip(f"{provider} does not run {case.name}: {reason}")
    _check(fn, q, k, v, grad_out, case, base_mode)

    if graphed:
        # fresh leaves for the capture: ones already used eagerly on the default stream
        # carry that stream in their autograd nodes (see benches._harness.cuda_graph)
        q, k, v = (x.detach().clone().requires_grad_(x.requires_grad) for x in (q, k, v))
    if base_mode == "fwd":
        def run():
            return fn(q, k, v, case.causal)
    else:
        def run():
            return torch.autograd.grad(fn(q, k, v, case.causal), (q, k, v), grad_out)
    if graphed:
        try:
            run = cuda_graph(run, calls=GRAPH_CALLS)
        except Exception as exc:
            if provider == "fastlab":
                raise
            pytest.skip(f"{provider} cannot be captured in a CUDA graph: "
                        f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}")

    bench.measure(OP, case.name, mode, provider, run, floor_bytes=case.floor_bytes(base_mode),
                  floor_flops=case.flops(base_mode), calls=GRAPH_CALLS if graphed else 1,
                  shape=dict(batch=case.batch, heads=case.heads, seq=case.seq,
                             head_dim=case.head_dim, dtype=str(case.dtype),
                             causal=case.causal))


# ----------------------------------------------------------------------------------------
# Packed ragged sequences and the attention options
# ----------------------------------------------------------------------------------------

#: (name, sequence lengths, heads, head dim): lengths drawn once, uniform in [1, longest].
VARLEN_CASES = [("ragged16-max4096-H16-D128", 16, 4096, 16, 128),
                ("ragged64-max1024-H16-D64", 64, 1024, 16, 64)]
VARLEN_PROVIDERS = ["fastlab", "flash-attn", "sdpa-padded"]


def _ragged(n: int, longest: int):
    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(1, longest + 1, (n,), generator=g)
    lengths[0] = longest
    return lengths.tolist()


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c[0])
def test_attention_varlen(bench, case, provider, mode):
    name, n, longest, heads, d = case
    lengths = _ragged(n, longest)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (randn((total, heads, d), torch.bfloat16, "cuda", seed=s,
                     requires_grad=mode == "full") for s in (1, 2, 3))
    grad_out = randn((total, heads, d), torch.bfloat16, "cuda", seed=4)
    if provider == "fastlab":
        def fn():
            return attention_varlen(q, k, v, cu, cu, longest, longest, causal=True)
    elif provider == "flash-attn":
        flash = optional_import("flash_attn")

        def fn():
            return flash.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
    else:
        # padded to the longest sequence, masked by SDPA's efficient kernel: what a
        # model without a varlen op runs
        lens = torch.tensor(lengths, device="cuda")
        mask = torch.arange(longest, device="cuda")[None, :] < lens[:, None]
        index = mask.flatten().nonzero().squeeze(1)

        def fn():
            padded = []
            for x in (q, k, v):
                full = x.new_zeros(n * longest, heads, d).index_copy(0, index, x)
                padded.append(full.view(n, longest, heads, d).transpose(1, 2))
            bias = mask[:, None, None, :] & torch.ones(longest, longest, dtype=torch.bool,
                                                       device="cuda").tril()[None, None]
            out = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=bias)
            return out.transpose(1, 2).reshape(n * longest, heads, d)[index]
    want = attention_ref(*(x[:lengths[0]].detach().transpose(0, 1)[None].float()
                           for x in (q, k, v)), causal=True)[0].transpose(0, 1)
    out = fn()
    assert_close(out[:lengths[0]], want, torch.bfloat16, scale=2.0, msg="first sequence")
    run = fn if mode == "fwd" else (lambda: torch.autograd.grad(fn(), (q, k, v), grad_out))
    pairs = sum(n_i * (n_i + 1) / 2 for n_i in lengths)  # causal (query, key) pairs
    flops = 4.0 * heads * d * pairs * (1.0 if mode == "fwd" else 3.5)
    tile = total * heads * d * 2
    bench.measure(OP, name, mode, provider, run, floor_flops=flops,
                  floor_bytes=(4 if mode == "fwd" else 12) * tile,
                  shape=dict(lengths=lengths, heads=heads, head_dim=d, dtype="bfloat16"))


#: Options on B4 H16 S4096 D128 causal bf16: a window of 1024 keys visits about a quarter
#: of the causal blocks, the others visit all of them.
OPTION_CASES = {"plain": {}, "window1024": dict(window=(1023, 0)),
                "softcap30": dict(softcap=30.0), "alibi": "alibi",
                "dropout0.1": dict(dropout_p=0.1, dropout_seed=0)}


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("option", list(OPTION_CASES))
def test_attention_options(bench, option, mode):
    case = CASES[0]
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v = (randn(shape, case.dtype, "cuda", seed=s, requires_grad=mode == "full")
               for s in (1, 2, 3))
    grad_out = randn(shape, case.dtype, "cuda", seed=4)
    options = OPTION_CASES[option]
    if options == "alibi":
        options = dict(alibi_slopes=torch.rand(case.heads, device="cuda"))

    def fn():
        return attention(q, k, v, causal=True, **options)

    run = fn if mode == "fwd" else (lambda: torch.autograd.grad(fn(), (q, k, v), grad_out))
    flops = case.flops(mode)
    if option == "window1024":
        flops *= (1024 * case.seq - 1024 * 1023 / 2) / (case.seq * (case.seq + 1) / 2)
    bench.measure(OP, f"{case.name}-{option}", mode, "fastlab", run,
                  floor_bytes=case.floor_bytes(mode), floor_flops=flops,
                  shape=dict(batch=case.batch, heads=case.heads, seq=case.seq,
                             head_dim=case.head_dim, dtype=str(case.dtype), causal=True,
                             option=option))


#: Varlen against the dense call of the same padded batch (B, H, S, D, bf16, causal).
#: "full": every sequence S long (nothing padded, same tokens as the dense call); "half":
#: sequences in pairs of lengths a and S - a (a uniform in [1, S - 1]), so half of the
#: padded batch's tokens are padding. The dense call runs the padded batch; with right
#: padding and a causal mask its valid rows are exact without a key mask. "dense" holds
#: each head's rows together, (B, H, S, D) contiguous; "dense-bshd" is the (B, S, H, D)
#: projection output viewed as (B, H, S, D), the token stride the packed layout has too.
VARLEN_DENSE_CASES = [(8, 16, 2048, 64), (16, 16, 1024, 64), (4, 16, 4096, 128)]


def _pair_lengths(batch: int, seq: int):
    g = torch.Generator().manual_seed(batch * seq)
    firsts = torch.randint(1, seq, (batch // 2,), generator=g).tolist()
    return [x for a in firsts for x in (a, seq - a)]


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("provider", ["varlen-full", "varlen-half", "dense", "dense-bshd"])
@pytest.mark.parametrize("case", VARLEN_DENSE_CASES, ids=lambda c: "B{}-H{}-S{}-D{}".format(*c))
def test_attention_varlen_vs_dense(bench, case, provider, mode):
    b, h, s, d = case
    if provider == "dense":
        shape = (b, h, s, d)
    elif provider == "dense-bshd":
        shape = (b, s, h, d)
    else:
        lengths = [s] * b if provider == "varlen-full" else _pair_lengths(b, s)
        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        shape = (sum(lengths), h, d)
    q, k, v = (randn(shape, torch.bfloat16, "cuda", seed=seed, requires_grad=mode == "full")
               for seed in (1, 2, 3))
    grad_out = randn(shape, torch.bfloat16, "cuda", seed=4)
    if provider == "dense-bshd":
        q, k, v, grad_out = (x.transpose(1, 2) for x in (q, k, v, grad_out))
    if provider.startswith("dense"):
        def fn():
            return attention(q, k, v, causal=True)
        first = [x[0] for x in (q, k, v)]
    else:
        def fn():
            return attention_varlen(q, k, v, cu, cu, s, s, causal=True)
        first = [x[:lengths[0]].transpose(0, 1) for x in (q, k, v)]
    want = attention_ref(*(x.detach()[None].float() for x in first), causal=True)[0]
    got = fn()[0] if provider.startswith("dense") else fn()[:lengths[0]].transpose(0, 1)
    assert_close(got, want, torch.bfloat16, scale=2.0, msg="first sequence")
    run = fn if mode == "fwd" else (lambda: torch.autograd.grad(fn(), (q, k, v), grad_out))
    pairs = b * s * (s + 1) / 2  # the padded batch's causal pairs: one work unit for all
    bench.measure(OP, "varlen-vs-dense-B{}-H{}-S{}-D{}".format(*case), mode, provider, run,
                  floor_flops=4.0 * h * d * pairs * (1.0 if mode == "fwd" else 3.5),
                  shape=dict(batch=b, heads=h, seq=s, head_dim=d, dtype="bfloat16",
                             tokens=b * s if provider.startswith("dense") else shape[0],
                             padded_tokens=b * s))
