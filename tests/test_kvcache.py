"""KV cache, attention over it (fused append, split-KV, ragged lengths) and generation."""
import pytest
import torch

from fastlab.models.generate import generate
from fastlab.models.gpt import GPT, GPTConfig
from fastlab.nn.attention import Attention
from fastlab.nn.kvcache import KVCache
from fastlab.ops._dispatch import backend
from fastlab.ops.kvcache import attention_with_kvcache, attention_with_kvcache_ref
from fastlab.testing import assert_close, non_contiguous, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


def _cache(batch, kv_heads, max_len, head_dim, dtype, lengths, seed=0, device=DEVICE):
    """A cache holding ``lengths[b]`` random tokens per row; every other slot is NaN, so a
    read past a live length shows up in the output."""
    cache = KVCache(batch, kv_heads, max_len, head_dim, dtype, device)
    cache.k_buffer.fill_(NAN)
    cache.v_buffer.fill_(NAN)
    longest = max(lengths)
    if longest:
        shape = (batch, kv_heads, longest, head_dim)
        with backend("reference"):
            cache.append(randn(shape, dtype, device, seed), randn(shape, dtype, device, seed + 1),
                         torch.tensor(lengths, device=device))
    return cache


def _snapshot(cache):
    return cache.k_buffer.clone(), cache.v_buffer.clone(), cache.lengths.clone()


# (batch, q heads, kv heads, head_dim, live lengths, q_len, new tokens, ragged new_lens)
CASES = {
    "decode": (4, 8, 8, 16, [37, 1, 53, 20], 1, 1, None),
    "decode_gqa_odd_dim": (2, 6, 2, 24, [70, 9], 1, 1, None),
    "decode_long_mqa": (1, 3, 1, 16, [129], 1, 1, None),
    "chunk_mqa": (3, 4, 1, 16, [37, 0, 20], 7, 7, None),
    "queries_only": (2, 2, 2, 16, [3, 40], 5, 0, None),
    "prefill_ragged": (3, 2, 1, 16, [5, 17, 0], 9, 9, [9, 4, 0]),
    "two_row_blocks": (2, 4, 2, 16, [10, 23], 33, 33, None),
}


def _check_once(case, dtype, causal=True, noncontig=False):
    batch, hq, hkv, d, lengths, q_len, n_new, new_lens = CASES[case]
    max_len = max(lengths) + n_new + 3
    cache = _cache(batch, hkv, max_len, d, dtype, lengths, seed=10)
    q = randn((batch, hq, q_len, d), dtype, DEVICE, seed=1)
    k_new = v_new = None
    if n_new:
        k_new = randn((batch, hkv, n_new, d), dtype, DEVICE, seed=2)
        v_new = randn((batch, hkv, n_new, d), dtype, DEVICE, seed=3)
    if noncontig:
        q = non_contiguous(q)
        k_new, v_new = non_contiguous(k_new), non_contiguous(v_new)
    lens = None if new_lens is None else torch.tensor(new_lens, device=DEVICE)
    k0, v0, len0 = _snapshot(cache)

    with backend("kernel"):
        out = attention_with_kvcache(q, cache, k_new, v_new, causal=causal, new_lens=lens)

    f64 = lambda x: None if x is None else x.double()  # noqa: E731
    expected = attention_with_kvcache_ref(f64(q), f64(k0), f64(v0), len0, f64(k_new),
                                          f64(v_new), lens, causal=causal)
    assert not out.isnan().any(), "a dead (NaN) cache slot was read"
    assert_close(out, expected, scale=2.0, msg=f"{case} {dtype}")
    # The cache now holds old + new tokens per row, and nothing else was written.
    added = [n_new] * batch if new_lens is None else new_lens
    assert cache.lengths.tolist() == [a + b for a, b in zip(lengths, added)]
    for b, (length, n) in enumerate(zip(lengths, added)):
        for buf, old, new in ((cache.k_buffer, k0, k_new), (cache.v_buffer, v0, v_new)):
            assert torch.equal(buf[b, :, :length], old[b, :, :length])
            if n:
                assert torch.equal(buf[b, :, length:length + n], new[b, :, :n])
            assert buf[b, :, length + n:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, dtype):
    _check_once(case, dtype)


@pytest.mark.parametrize("case", ["decode_gqa_odd_dim", "chunk_mqa", "prefill_ragged"])
def test_kernel_non_causal_and_non_contiguous(case):
    _check_once(case, torch.float32, causal=False, noncontig=True)


def test_cases_cover_split_and_single_pass():
    from fastlab.kernels.kvcache_attention import plan_splits

    cpu = torch.device("cpu")
    # (row blocks x batch x kv heads, keys after the append) of the CPU cases above
    assert plan_splits(4 * 8, 54, cpu)[0] == 1          # decode
    assert plan_splits(2 * 2, 71, cpu)[0] == 3          # decode_gqa_odd_dim
    assert plan_splits(1 * 1, 130, cpu)[0] == 5         # decode_long_mqa
    assert plan_splits(1 * 3, 26, cpu)[0] == 1          # prefill_ragged
    assert plan_splits(2 * 2 * 2, 56, cpu)[0] == 2      # two_row_blocks
    for programs, keys in ((1, 129), (5, 1000), (1, 1)):
        splits, size = plan_splits(programs, keys, cpu)
        assert splits * size >= keys > (splits - 1) * size


# ----------------------------------------------------------------------------- cache semantics
@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_append_truncate_reset(name):
    b, h, s, d = 3, 2, 19, 8
    cache = _cache(b, h, s, d, torch.float32, [0, 0, 0])
    k1, v1 = randn((b, h, 4, d), seed=1), randn((b, h, 4, d), seed=2)
    k2, v2 = randn((b, h, 3, d), seed=3), randn((b, h, 3, d), seed=4)
    with backend(name):
        cache.append(k1, v1)
        assert cache.uniform and cache.length_bound == 4
        assert torch.equal(cache.k, k1) and torch.equal(cache.v, v1)
        assert cache.k.data_ptr() == cache.k_buffer.data_ptr()  # a view, not a copy
        cache.append(k2, v2, torch.tensor([3, 0, 2]))
        assert cache.lengths.tolist() == [7, 4, 6] and not cache.uniform
        assert torch.equal(cache.k[0], torch.cat([k1[0], k2[0]], dim=1))
        assert torch.equal(cache.v[2, :, :6], torch.cat([v1[2], v2[2, :, :2]], dim=1))

        cache.truncate(5)  # rolls back only the rows longer than 5
        assert cache.lengths.tolist() == [5, 4, 5]
        cache.truncate(torch.tensor([2, 9, 0]))
        assert cache.lengths.tolist() == [2, 4, 0]
        cache.append(k2, v2)  # overwrites the rolled-back slots
        assert cache.lengths.tolist() == [5, 7, 3]
        assert torch.equal(cache.k_buffer[0, :, :5], torch.cat([k1[0, :, :2], k2[0]], dim=1))
        assert torch.equal(cache.k_buffer[2, :, :3], k2[2])

        cache.reset()
        assert cache.lengths.tolist() == [0, 0, 0] and cache.length_bound == 0
        assert cache.k.shape == (b, h, 0, d)


@pytest.mark.parametrize("name", ["reference", "kernel"])
@pytest.mark.parametrize("bounded", [False, True], ids=["checked", "length_bound"])
def test_cache_over_caller_buffers(name, bounded):
    """A flash-attn style caller: its own (batch, max_len, kv_heads, head_dim) buffers and
    lengths, wrapped without a copy; the attention writes the new tokens into them and
    advances the caller's int32 lengths in place."""
    b, hq, hkv, s, d = 3, 4, 2, 24, 8
    lengths = [5, 0, 11]
    k_store = randn((b, s, hkv, d), seed=20)
    v_store = randn((b, s, hkv, d), seed=21)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cache = KVCache.from_buffers(k_store.transpose(1, 2), v_store.transpose(1, 2), seqlens,
                                 length_bound=max(lengths) if bounded else None)
    assert cache.k_buffer.data_ptr() == k_store.data_ptr() and cache.lengths is seqlens
    assert (cache.batch, cache.kv_heads, cache.max_len, cache.head_dim) == (b, hkv, s, d)
    assert cache.length_bound == 11 and cache.uniform is False
    k0, v0 = k_store.transpose(1, 2).clone(), v_store.transpose(1, 2).clone()
    q = randn((b, hq, 3, d), seed=22)
    k_new, v_new = randn((b, hkv, 3, d), seed=23), randn((b, hkv, 3, d), seed=24)
    with backend(name):
        out = attention_with_kvcache(q, cache, k_new, v_new)
    expected = attention_with_kvcache_ref(q, k0, v0, torch.tensor(lengths), k_new, v_new)
    assert_close(out, expected)
    assert seqlens.tolist() == [8, 3, 14]  # the caller's tensor, advanced
    for row, n in enumerate(lengths):
        assert torch.equal(k_store[row, n:n + 3].transpose(0, 1), k_new[row])
        assert torch.equal(v_store[row, :n], v0[row, :, :n].transpose(0, 1))


@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_set_lengths_on_caller_written_slots(name):
    """The caller writes keys/values itself and tells the cache the lengths: decoding
    attends over exactly those slots; a length_bound clamps instead of reading back."""
    b, h, s, d = 2, 2, 16, 8
    cache = KVCache(b, h, s, d)
    cache.k_buffer.copy_(randn((b, h, s, d), seed=30))
    cache.v_buffer.copy_(randn((b, h, s, d), seed=31))
    q = randn((b, h, 1, d), seed=32)
    for lengths, bound, live in (([7, 12], None, [7, 12]), (torch.tensor([4, 9]), None, [4, 9]),
                                 (torch.tensor([3, 15]), 10, [3, 10]), (6, None, [6, 6])):
        cache.set_lengths(torch.tensor(lengths) if isinstance(lengths, list) else lengths,
                          length_bound=bound)
        assert cache.lengths.tolist() == live and cache.lengths.dtype == torch.int32
        k0, v0 = cache.k_buffer.clone(), cache.v_buffer.clone()
        with backend(name):
            out = attention_with_kvcache(q, cache)
        assert_close(out, attention_with_kvcache_ref(q, k0, v0, torch.tensor(live)))
    assert cache.uniform and cache.length_bound == 6


@pytest.mark.parametrize("call, error, match", [
    (lambda k, v: KVCache.from_buffers(k[0], v), ValueError, "k_buffer must have shape"),
    (lambda k, v: KVCache.from_buffers(k, v[:, :, :4]), ValueError, "v_buffer .* k_buffer's shape"),
    (lambda k, v: KVCache.from_buffers(k, v.double()), ValueError, "must match k_buffer"),
    (lambda k, v: KVCache.from_buffers(k.long(), v.long()), TypeError, "floating point"),
    (lambda k, v: KVCache.from_buffers(k.requires_grad_(), v), ValueError, "not require grad"),
    (lambda k, v: KVCache.from_buffers(k, v, 9), ValueError, r"lengths must lie in \[0, 8\]"),
    (lambda k, v: KVCache.from_buffers(k, v, torch.tensor([1, -1])), ValueError,
     "lengths must lie"),
    (lambda k, v: KVCache.from_buffers(k, v, torch.tensor([1.0, 2.0])), TypeError,
     "integer tensor"),
    (lambda k, v: KVCache.from_buffers(k, v, torch.tensor([1, 2, 3])), ValueError,
     r"shape \(2,\)"),
    (lambda k, v: KVCache.from_buffers(k, v, 3, length_bound=9), ValueError, "length_bound"),
    (lambda k, v: KVCache.from_buffers(k, v, 5, length_bound=4), ValueError,
     "exceeds length_bound"),
    (lambda k, v: KVCache.from_buffers(k, v, "3"), TypeError, "int or a tensor"),
])
def test_caller_buffers_bad_input(call, error, match):
    k, v = torch.zeros(2, 1, 8, 4), torch.zeros(2, 1, 8, 4)
    with pytest.raises(error, match=match):
        call(k, v)


def test_capacity_check_reads_exact_lengths_only_when_needed():
    cache = _cache(2, 1, 10, 4, torch.float32, [8, 2])
    cache.truncate(torch.tensor([2, 2]))  # host bound still says 8
    assert cache.length_bound == 8
    k = randn((2, 1, 6, 4))
    cache.append(k, k)  # fits: the exact lengths are 2 and 2
    assert cache.lengths.tolist() == [8, 8]
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="exceed max_len 10"):
        cache.append(k, k)
    for x, y in zip(before, _snapshot(cache)):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


# ----------------------------------------------------------------------------- score options
#: window, softcap and ALiBi as flash-attn defines them (fastlab.ops.attention's semantics)
OPTIONS = {
    "window-left": dict(window=(4, -1)),
    "window-both": dict(window=(6, 2)),
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi_slopes="heads"),
    "all": dict(window=(9, 0), softcap=4.0, alibi_slopes="batch-heads"),
}


def _options(name, batch, heads, device=DEVICE):
    opts = dict(OPTIONS[name])
    kind = opts.get("alibi_slopes")
    if kind is not None:
        g = torch.Generator().manual_seed(7)
        shape = (heads,) if kind == "heads" else (batch, heads)
        opts["alibi_slopes"] = (torch.rand(shape, generator=g) * 0.5).to(device)
    return opts


@pytest.mark.parametrize("option", list(OPTIONS))
def test_reference_options_match_attention_ref(option):
    """The KV-cache reference with an option equals fastlab.ops.attention_ref over the
    concatenated keys (uniform lengths: the same bottom-right positions)."""
    from fastlab.ops.attention import attention_ref

    b, hq, hkv, d, length, t = 2, 4, 2, 8, 13, 3
    cache = _cache(b, hkv, 20, d, torch.float64, [length] * b, seed=3)
    q = randn((b, hq, t, d), torch.float64, DEVICE, seed=4)
    kn, vn = (randn((b, hkv, t, d), torch.float64, DEVICE, seed=s) for s in (5, 6))
    opts = _options(option, b, hq)
    for causal in (True, False):
        got = attention_with_kvcache_ref(q, cache.k_buffer, cache.v_buffer, cache.lengths, kn,
                                         vn, causal=causal, **opts)
        k = torch.cat([cache.k_buffer[:, :, :length], kn], 2).repeat_interleave(2, 1)
        v = torch.cat([cache.v_buffer[:, :, :length], vn], 2).repeat_interleave(2, 1)
        assert_close(got, attention_ref(q, k, v, causal=causal, **opts), msg=option)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", ["decode_gqa_odd_dim", "decode_long_mqa", "prefill_ragged",
                                  "two_row_blocks", "chunk_mqa"])
def test_kernel_options_match_reference(case, option):
    """The fused kernel (split-KV included) with each option against the float64
    reference; causal and not; the new tokens still all land in the cache."""
    batch, hq, hkv, d, lengths, q_len, n_new, new_lens = CASES[case]
    opts = _options(option, batch, hq)
    for causal in (True, False):
        cache = _cache(batch, hkv, max(lengths) + n_new + 3, d, torch.float32, lengths, seed=10)
        q = randn((batch, hq, q_len, d), seed=1)
        k_new = randn((batch, hkv, n_new, d), seed=2)
        v_new = randn((batch, hkv, n_new, d), seed=3)
        lens = None if new_lens is None else torch.tensor(new_lens, device=DEVICE)
        k0, v0, len0 = _snapshot(cache)
        with backend("kernel"):
            out = attention_with_kvcache(q, cache, k_new, v_new, causal=causal, new_lens=lens,
                                         **opts)
        expected = attention_with_kvcache_ref(q.double(), k0.double(), v0.double(), len0,
                                              k_new.double(), v_new.double(), lens,
                                              causal=causal, **opts)
        assert not out.isnan().any(), "a dead (NaN) cache slot was read"
        assert_close(out, expected, scale=2.0, msg=f"{case} {option} causal={causal}")
        plain = attention_with_kvcache_ref(q.double(), k0.double(), v0.double(), len0,
                                           k_new.double(), v_new.double(), lens, causal=causal)
        assert (plain - expected).abs().max() > 1e-3, "the option changed nothing here"
        added = [n_new] * batch if new_lens is None else new_lens
        for row, (length, n) in enumerate(zip(lengths, added)):
            assert torch.equal(cache.k_buffer[row, :, length:length + n], k_new[row, :, :n])


@pytest.mark.parametrize("option", ["window-both", "all"])
@pytest.mark.parametrize("prefix_lens", [[4, 4], [5, 1, 0]], ids=["uniform", "ragged"])
def test_training_through_cache_with_options(option, prefix_lens):
    opts = _options(option, len(prefix_lens), 4, device="cpu")
    opts = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = opts["alibi_slopes"].float()
    _train_once("auto", prefix_lens, **opts)


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
def test_dropout_through_cache_draws_attentions_numbers(ragged):
    """Training through the cache with dropout: the output and gradients of fastlab's
    attention over the concatenated keys with the same seed (the ragged cache without
    causality, which kv_lens expresses); an inference call with dropout is refused."""
    from fastlab.ops.attention import attention as dense

    b, hq, hkv, d, t = 2, 4, 2, 8, 3
    lengths = [6, 2] if ragged else [5, 5]
    cache = _cache(b, hkv, 16, d, torch.float64, lengths, seed=50)
    pk, pv, _ = _snapshot(cache)
    q = randn((b, hq, t, d), torch.float64, DEVICE, seed=51).requires_grad_()
    kn = randn((b, hkv, t, d), torch.float64, DEVICE, seed=52).requires_grad_()
    vn = randn((b, hkv, t, d), torch.float64, DEVICE, seed=53).requires_grad_()
    drop = dict(dropout_p=0.3, dropout_seed=11, dropout_offset=4)
    with backend("reference"):
        out = attention_with_kvcache(q, cache, kn, vn, causal=not ragged, **drop)
    got = torch.autograd.grad(out.sum(), (q, kn, vn))
    # the same keys laid out densely: row r holds its live prefix, then its new tokens
    width = max(lengths) + t
    pad = [pk.new_zeros(hkv, width - n - t, d) for n in lengths]
    kd = torch.stack([torch.cat([pk[r, :, :n], kn[r], pad[r]], 1) for r, n in enumerate(lengths)])
    vd = torch.stack([torch.cat([pv[r, :, :n], vn[r], pad[r]], 1) for r, n in enumerate(lengths)])
    lens = torch.tensor([n + t for n in lengths])
    with backend("reference"):
        want_out = dense(q, kd, vd, causal=not ragged, kv_lens=lens if ragged else None, **drop)
    want = torch.autograd.grad(want_out.sum(), (q, kn, vn))
    assert_close(out, want_out)
    for g, w in zip(got, want):
        assert_close(g, w)
    plain = attention_with_kvcache_ref(q.detach(), pk, pv, torch.tensor(lengths), kn.detach(),
                                       vn.detach(), causal=not ragged)
    assert (plain - out.detach()).abs().max() > 1e-3, "dropout changed nothing"
    with torch.no_grad(), pytest.raises(ValueError, match="dropout_p > 0 applies to training"):
        attention_with_kvcache(q, cache, kn, vn, **drop)


@pytest.mark.parametrize("opts, error, match", [
    (dict(window=(3,)), ValueError, "window must be a pair"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError, "float32"),
])
def test_option_bad_input_leaves_cache_unchanged(opts, error, match):
    cache = _cache(2, 2, 8, 4, torch.float32, [2, 3])
    before = _snapshot(cache)
    q, k = randn((2, 4, 1, 4), seed=1), randn((2, 2, 1, 4), seed=2)
    with pytest.raises(error, match=match):
        attention_with_kvcache(q, cache, k, k, **opts)
    for x, y in zip(before, _snapshot(cache)):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


# ----------------------------------------------------------------------------- training
class _Thinker(torch.nn.Module):
    """Projections of the log's latent model: each step appends k/v and attends."""

    def __init__(self, d_model=12, heads=4, kv_heads=2, head_dim=5):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = torch.nn.Linear(d_model, heads * head_dim)
        self.kv = torch.nn.Linear(d_model, 2 * kv_heads * head_dim)

    def project(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        return q, k.transpose(1, 2), v.transpose(1, 2)


def _train_once(name, prefix_lens, steps=(3, 1, 4), dtype=torch.float64, compile_backend=None,
                fullgraph=True, device="cpu", **options):
    """Several forward steps that append to the cache and attend over it, one backward;
    the same computation with explicitly concatenated keys/values gives the reference.
    ``compile_backend``: each step runs through ``torch.compile`` with that backend."""
    torch.manual_seed(0)
    model = _Thinker().to(device, dtype)
    batch = len(prefix_lens)
    xs = [randn((batch, t, 12), dtype, device, seed=20 + i, requires_grad=True)
          for i, t in enumerate(steps)]
    weights = [randn((batch, 4, t, 5), dtype, device, seed=40 + i) for i, t in enumerate(steps)]
    prefix = _cache(batch, 2, 16, 5, dtype, prefix_lens, seed=60, device=device)
    pk, pv, plen = _snapshot(prefix)

    def step(x, w, cache):
        q, k, v = model.project(x)
        return (attention_with_kvcache(q, cache, k, v, **options) * w).sum()

    if compile_backend is not None:
        torch._dynamo.reset()
        step = torch.compile(step, backend=compile_backend, fullgraph=fullgraph)
    loss = 0
    with backend(name):
        for x, w in zip(xs, weights):
            loss = loss + step(x, w, prefix)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()] + [x.grad.clone() for x in xs]
    model.zero_grad()
    for x in xs:
        x.grad = None

    loss, ks, vs = 0, [], []
    for x, w in zip(xs, weights):
        q, k, v = model.project(x)
        ks.append(k)
        vs.append(v)
        out = attention_with_kvcache_ref(q, pk, pv, plen, torch.cat(ks, 2), torch.cat(vs, 2),
                                         **options)
        loss = loss + (out * w).sum()
    loss.backward()
    want = [p.grad for p in model.parameters()] + [x.grad for x in xs]
    for i, (g, e) in enumerate(zip(got, want)):
        assert_close(g, e, scale=100.0 if dtype == torch.float64 else 1.0, msg=f"grad {i}")


@pytest.mark.parametrize("name", ["reference", "kernel"])
@pytest.mark.parametrize("prefix_lens", [[0, 0], [4, 4], [5, 1, 0]])
def test_training_through_cache_matches_concatenation(name, prefix_lens):
    _train_once(name, prefix_lens)


def test_training_float32():
    _train_once("reference", [2, 6], dtype=torch.float32)


@pytest.mark.parametrize("prefix_lens, fullgraph", [([0, 0], False), ([5, 1, 0], False)],
                         ids=["empty-prefix", "ragged"])
def test_training_through_cache_under_compile(prefix_lens, fullgraph):
    """Compiled steps that append and attend, one backward: the attention of the first
    step keeps the slots it read while the second step's append writes the buffer.
    Traced, a ``.data`` alias of the buffer shared the buffer's version counter, and
    backward raised autograd's "modified by an inplace operation" error. The training
    path runs eagerly inside the compiled function (a graph break: traced by Inductor on
    CUDA it returned zero gradients), so fullgraph is not asked for."""
    _train_once("reference", prefix_lens, steps=(3, 2), compile_backend="aot_eager",
                fullgraph=fullgraph)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_lens", [[4, 4], [5, 1, 0]], ids=["uniform", "ragged"])
def test_cuda_training_through_cache_under_inductor(prefix_lens):
    """The same on CUDA tensors, compiled by inductor (the training path is a graph break
    there too, so fullgraph is not asked for)."""
    _train_once("auto", prefix_lens, compile_backend="inductor", fullgraph=False,
                device="cuda")


@pytest.mark.parametrize("append_after", [False, True])
def test_backward_after_truncate(append_after):
    """Truncating alone keeps backward valid; appending over the read slots makes it raise."""
    cache = _cache(1, 1, 8, 4, torch.float64, [0])
    k = randn((1, 1, 3, 4), torch.float64, requires_grad=True)
    out = attention_with_kvcache(randn((1, 1, 3, 4), torch.float64), cache, k, k)
    cache.truncate(1)
    if append_after:
        attention_with_kvcache(randn((1, 1, 1, 4), torch.float64), cache,
                               randn((1, 1, 1, 4), torch.float64),
                               randn((1, 1, 1, 4), torch.float64))
        with pytest.raises(RuntimeError, match="truncated or reset and then appended"):
            out.sum().backward()
    else:
        out.sum().backward()
        assert k.grad.abs().sum() > 0


def test_truncated_chunk_gets_no_gradient_for_dropped_slots():
    cache = _cache(1, 1, 8, 4, torch.float64, [0])
    k = randn((1, 1, 3, 4), torch.float64, requires_grad=True)
    v = randn((1, 1, 3, 4), torch.float64, seed=1, requires_grad=True)
    attention_with_kvcache(randn((1, 1, 3, 4), torch.float64), cache, k, v)
    cache.truncate(1)
    q = randn((1, 1, 2, 4), torch.float64, seed=2)
    out = attention_with_kvcache(q, cache)
    out.sum().backward()
    assert torch.equal(k.grad[:, :, 1:], torch.zeros_like(k.grad[:, :, 1:]))
    k1, v1 = k.detach()[:, :, :1].requires_grad_(), v.detach()[:, :, :1].requires_grad_()
    expected = attention_with_kvcache_ref(q, k1, v1, torch.tensor([1]))
    expected.sum().backward()
    assert_close(out, expected)
    assert_close(k.grad[:, :, :1], k1.grad)
    assert_close(v.grad[:, :, :1], v1.grad)


# ----------------------------------------------------------------------------- custom ops
def test_opcheck_and_compile():
    cache = _cache(2, 2, 12, 8, torch.float32, [3, 5])
    q, k = randn((2, 4, 2, 8), seed=1), randn((2, 2, 2, 8), seed=2)
    args = (q, cache.k_buffer.nan_to_num(), cache.v_buffer.nan_to_num(), cache.lengths.clone(),
            k, k, None, True, 0.3, 12, -1, -1, 0.0, None)
    torch.library.opcheck(torch.ops.fastlab.kvcache_attention.default, args)
    torch.library.opcheck(torch.ops.fastlab.kvcache_attention.default,
                          args[:10] + (3, 0, 5.0, torch.rand(4)))
    torch.library.opcheck(torch.ops.fastlab.kvcache_append.default,
                          (args[1], args[2], args[3], k, k, torch.tensor([1, 2], dtype=torch.int32)))

    def step(q, k, v):
        return attention_with_kvcache(q, cache, k, v)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    twin = _cache(2, 2, 12, 8, torch.float32, [3, 5])
    q1 = randn((2, 4, 1, 8), seed=3)
    k1 = randn((2, 2, 1, 8), seed=4)
    with torch.no_grad():
        got = compiled(q1, k1, k1)
        want = attention_with_kvcache(q1, twin, k1, k1)
    assert_close(got, want)
    assert cache.lengths.tolist() == twin.lengths.tolist() == [4, 6]


# ----------------------------------------------------------------------------- bad input
def _bad_inputs():
    c = lambda: _cache(2, 2, 6, 4, torch.float32, [5, 1])  # noqa: E731
    q = randn((2, 4, 1, 4))
    kv = randn((2, 2, 1, 4))
    cases = [
        ("past_max_len", lambda: attention_with_kvcache(q, c(), randn((2, 2, 2, 4)),
                                                        randn((2, 2, 2, 4))),
         ValueError, "exceed max_len 6"),
        ("append_past_max_len", lambda: c().append(randn((2, 2, 2, 4)), randn((2, 2, 2, 4))),
         ValueError, "exceed max_len"),
        ("q_batch", lambda: attention_with_kvcache(randn((3, 4, 1, 4)), c()), ValueError,
         "batch 3 but the cache holds 2"),
        ("q_heads", lambda: attention_with_kvcache(randn((2, 3, 1, 4)), c()), ValueError,
         "not a multiple"),
        ("q_head_dim", lambda: attention_with_kvcache(randn((2, 4, 1, 5)), c()), ValueError,
         "head_dim 5"),
        ("q_rank", lambda: attention_with_kvcache(randn((2, 4, 4)), c()), ValueError,
         r"shape \(batch, heads, q_len, head_dim\)"),
        ("q_type", lambda: attention_with_kvcache([1.0], c()), TypeError, "q must be a tensor"),
        ("q_dtype", lambda: attention_with_kvcache(q.half(), c()), TypeError, "dtype"),
        ("q_device", lambda: attention_with_kvcache(q.to("meta"), c()), ValueError, "is on meta"),
        ("k_new_batch", lambda: attention_with_kvcache(q, c(), randn((1, 2, 1, 4)),
                                                       randn((1, 2, 1, 4))),
         ValueError, "k_new must have shape"),
        ("k_new_dtype", lambda: attention_with_kvcache(q, c(), kv.double(), kv.double()),
         TypeError, "k_new has dtype"),
        ("v_new_device", lambda: attention_with_kvcache(q, c(), kv, kv.to("meta")), ValueError,
         "v_new is on meta"),
        ("k_without_v", lambda: attention_with_kvcache(q, c(), kv), ValueError, "together"),
        ("kv_shapes", lambda: c().append(randn((2, 2, 1, 4)), randn((2, 2, 2, 4))), ValueError,
         "differ in shape"),
        ("new_lens_range", lambda: c().append(kv, kv, torch.tensor([1, 2])), ValueError,
         r"new_lens must lie in \[0, 1\]"),
        ("new_lens_dtype", lambda: c().append(kv, kv, torch.tensor([1.0, 0.0])), TypeError,
         "integer"),
        ("new_lens_shape", lambda: c().append(kv, kv, torch.tensor([1])), ValueError,
         r"new_lens must have shape \(2,\)"),
        ("new_lens_alone", lambda: attention_with_kvcache(q, c(), new_lens=torch.tensor([1, 1])),
         ValueError, "needs k_new"),
        ("new_lens_q_len", lambda: attention_with_kvcache(
            randn((2, 4, 2, 4)), c(), kv, kv, new_lens=torch.tensor([1, 1])), ValueError,
         "q_len"),
        ("truncate_negative", lambda: c().truncate(-1), ValueError, ">= 0"),
        ("truncate_negative_row", lambda: c().truncate(torch.tensor([1, -2])), ValueError,
         ">= 0"),
        ("truncate_shape", lambda: c().truncate(torch.tensor([1, 2, 3])), ValueError,
         r"shape \(2,\)"),
        ("truncate_type", lambda: c().truncate(1.5), TypeError, "int or a tensor"),
        ("cache_size", lambda: KVCache(2, 0, 8, 4), ValueError, "kv_heads must be a positive"),
        ("cache_dtype", lambda: KVCache(2, 1, 8, 4, torch.int32), TypeError, "floating-point"),
    ]
    return [pytest.param(call, error, match, id=name) for name, call, error, match in cases]


@pytest.mark.parametrize("call,error,match", _bad_inputs())
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_failed_call_leaves_cache_unchanged(name):
    cache = _cache(2, 2, 6, 4, torch.float32, [5, 1])
    before = _snapshot(cache)
    q = randn((2, 4, 2, 4))
    with backend(name):
        for call in (
            lambda: attention_with_kvcache(q, cache, randn((2, 2, 2, 4)), randn((2, 2, 2, 4))),
            lambda: attention_with_kvcache(q, cache, randn((2, 2, 2, 4)), randn((2, 2, 2, 4)),
                                           new_lens=torch.tensor([2, 3])),
            lambda: cache.append(randn((2, 2, 2, 4)), randn((2, 2, 1, 4))),
        ):
            with pytest.raises(ValueError):
                call()
    for x, y in zip(before, _snapshot(cache)):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())
    assert cache.length_bound == 5


# ----------------------------------------------------------------------------- model
def _gpt(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=23, block_size=24, n_layer=2, n_head=2, d_model=16)).to(
        DEVICE, dtype).eval()


@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_gpt_chunked_forward_with_caches_matches_full(name):
    model = _gpt()
    idx = torch.randint(0, 23, (3, 9), device=DEVICE)
    full, _ = model(idx)
    caches = model.new_kv_caches(3, 12)
    with torch.no_grad(), backend(name):
        parts = [model(idx[:, a:b], caches=caches)[0] for a, b in ((0, 4), (4, 5), (5, 9))]
    assert_close(torch.cat(parts, 1), full, scale=10.0)


def test_gpt_trains_through_caches():
    model = _gpt(dtype=torch.float64).train()
    idx = torch.randint(0, 23, (2, 8), device=DEVICE)
    targets = torch.randint(0, 23, (2, 8), device=DEVICE)
    caches = model.new_kv_caches(2, 8)
    logits = torch.cat([model(idx[:, a:b], caches=caches)[0] for a, b in ((0, 3), (3, 4),
                                                                        (4, 8))], 1)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(idx, targets)[1].backward()
    for n, p in model.named_parameters():
        assert_close(got[n], p.grad, scale=100.0, msg=n)


@pytest.mark.parametrize("name", ["reference", "kernel"])
def test_greedy_generation_of_ragged_prompts_matches_uncached(name):
    model = _gpt()
    prompts = [torch.randint(0, 23, (n,), device=DEVICE) for n in (5, 9, 2)]
    with backend(name):
        out = generate(model, prompts, 4)
    for p, row in zip(prompts, out):
        assert row.tolist() == model.greedy_complete(p[None], 4)[0].tolist()


def test_sampling():
    model = _gpt()
    prompts = torch.randint(0, 23, (4, 3), device=DEVICE)
    greedy = generate(model, prompts, 5)
    assert torch.equal(generate(model, prompts, 5, temperature=0.7, top_k=1), greedy)
    g = lambda: torch.Generator(DEVICE).manual_seed(7)  # noqa: E731
    a = generate(model, prompts, 5, temperature=1.3, top_k=3, generator=g())
    assert torch.equal(a, generate(model, prompts, 5, temperature=1.3, top_k=3, generator=g()))
    seq = torch.cat([prompts, a], 1)
    logits, _ = model(seq[:, :-1])
    top3 = logits[:, 2:].topk(3, dim=-1).indices  # logits that chose each new token
    assert (top3 == a[..., None]).any(-1).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda m: generate(m, [torch.tensor([1, 2])], 0), ValueError, "max_new_tokens"),
    (lambda m: generate(m, [torch.tensor([1, 2])], 24), ValueError, "exceeds block_size"),
    (lambda m: generate(m, [], 2), ValueError, "at least one prompt"),
    (lambda m: generate(m, [torch.tensor([1.0])], 2), TypeError, "integer token ids"),
    (lambda m: generate(m, [torch.tensor([1])], 2, temperature=-1.0), ValueError,
     "temperature"),
    (lambda m: generate(m, [torch.tensor([1])], 2, temperature=1.0, top_k=0), ValueError,
     "top_k"),
    (lambda m: m.new_kv_caches(2, 25), ValueError, "max_len must lie"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                 logits_at=torch.tensor([1])), ValueError, "not both"),
    (lambda m: m(torch.zeros(1, 2, dtype=torch.long), caches=m.new_kv_caches(1)[:1]),
     ValueError, "one KVCache per block"),
    (lambda m: Attention(16, 2)(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16),
                                cache=m.new_kv_caches(1)[0]), ValueError, "not both"),
])
def test_generation_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(_gpt())


# ----------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads,kv_heads,length", [(16, 32, 32, 4096), (4, 32, 8, 32768)])
def test_gpu_decode_real_size(batch, heads, kv_heads, length):
    dtype = torch.bfloat16
    lengths = torch.randint(1, length, (batch,)).tolist()
    lengths[0] = length - 1
    cache = _cache(batch, kv_heads, length, 128, dtype, lengths, seed=5)
    k0, v0, len0 = _snapshot(cache)
    q = randn((batch, heads, 1, 128), dtype, DEVICE, seed=6)
    kv = randn((batch, kv_heads, 1, 128), dtype, DEVICE, seed=7)
    out = attention_with_kvcache(q, cache, kv, kv)
    expected = attention_with_kvcache_ref(q, k0, v0, len0, kv, kv)
    assert_close(out, expected)
    assert cache.lengths.tolist() == [n + 1 for n in lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_prefill_real_size(dtype):
    lengths = [0, 700, 1500, 33]
    new = [300, 17, 300, 1]
    cache = _cache(4, 4, 2048, 64, dtype, lengths, seed=8)
    k0, v0, len0 = _snapshot(cache)
    q = randn((4, 16, 300, 64), dtype, DEVICE, seed=9)
    k, v = randn((4, 4, 300, 64), dtype, DEVICE, seed=10), randn((4, 4, 300, 64), dtype,
                                                                   DEVICE, seed=11)
    lens = torch.tensor(new, device=DEVICE)
    out = attention_with_kvcache(q, cache, k, v, new_lens=lens)
    expected = attention_with_kvcache_ref(q, k0, v0, len0, k, v, lens)
    assert_close(out, expected, scale=2.0)
    assert not out.isnan().any()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_small_head_dims(head_dim, dtype):
    """Heads narrower than a tensor-core tile (the thinker's d_model 16 over 8 heads) are
    padded to 16 inside the kernel: tl.dot refuses a reduction dimension below 16."""
    lengths = [5, 0, 9]
    cache = _cache(3, 2, 32, head_dim, dtype, lengths, seed=12)
    k0, v0, len0 = _snapshot(cache)
    q = randn((3, 4, 6, head_dim), dtype, DEVICE, seed=13)
    k, v = (randn((3, 2, 6, head_dim), dtype, DEVICE, seed=s) for s in (14, 15))
    out = attention_with_kvcache(q, cache, k, v)
    assert_close(out, attention_with_kvcache_ref(q, k0, v0, len0, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("option", list(OPTIONS))
def test_gpu_options_real_size(option):
    """Decode over a long ragged bf16 cache (split-KV) with each score option."""
    dtype = torch.bfloat16
    lengths = [4095, 17, 2048, 1000]
    cache = _cache(4, 8, 4096 + 8, 128, dtype, lengths, seed=40)
    k0, v0, len0 = _snapshot(cache)
    q = randn((4, 32, 1, 128), dtype, DEVICE, seed=41)
    kv = randn((4, 8, 1, 128), dtype, DEVICE, seed=42)
    opts = _options(option, 4, 32)
    if "window" in opts:
        opts["window"] = (700, 0)
    out = attention_with_kvcache(q, cache, kv, kv, **opts)
    assert_close(out, attention_with_kvcache_ref(q, k0, v0, len0, kv, kv, **opts))
    assert cache.lengths.tolist() == [n + 1 for n in lengths]
