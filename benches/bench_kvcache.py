"""Attention over a KV cache: decode against SDPA and flash-attn, and end-to-end generation.

Cases
* ``decode`` (q_len 1, bf16, D 128, MHA), full caches B16 H32 T4096 and B4 H32 T32768:
  mode ``fwd`` attends over the cache; mode ``append`` also writes one new token (fused in
  fastlab; an indexed copy before SDPA for the peer) and rolls it back, so every call sees
  the same cache. Floor: the live cache read once.
* ``ragged``: the same shapes with lengths uniform in [1, T] (seeded); the peer is SDPA over
  the padded cache with a key mask. Floor: the live tokens read once.
* ``generate``: 256 greedy tokens after 16 prompts of 3840 tokens with a 12-layer GPT
  (d_model 2048, 16 heads of 128): fastlab's ``generate`` against a plain PyTorch loop that
  concatenates each layer's keys/values at every step. ``ratio_vs`` gives the speed-up;
  tokens/s = 4096 / median seconds. Floor: at every step the weights and the live caches
  read once.

Every provider's output is checked against the reference before it is timed.
"""
import pytest
import torch
import torch.nn.functional as F

from benches.conftest import optional_import
from fastlab.kernels import kvcache_attention as kv_kernels
from fastlab.models.generate import generate
from fastlab.models.gpt import GPT, GPTConfig
from fastlab.nn.kvcache import KVCache
from fastlab.ops.kvcache import attention_with_kvcache, attention_with_kvcache_ref
from fastlab.testing import assert_close, randn

OP = "kvcache_attention"
DTYPE = torch.bfloat16
HEAD_DIM = 128
DECODE = [(16, 32, 4096), (4, 32, 32768)]  # (batch, heads, cache length)
#: Split planning variants timed beside the default: programs per SM the key splits aim for.
SPLIT_VARIANTS = (8, 16)


def _with_programs_per_sm(n, fn):
    """fn run with the split planner aiming at n programs per SM (a sweep of its constant)."""
    def run():
        default = kv_kernels._PROGRAMS_PER_SM
        kv_kernels._PROGRAMS_PER_SM = n
        try:
            return fn()
        finally:
            kv_kernels._PROGRAMS_PER_SM = default
    return run


def _measure_split_variants(bench, case, mode, fastlab, check, nbytes, flops, shape):
    for n in SPLIT_VARIANTS:
        run = _with_programs_per_sm(n, fastlab)
        check(run())
        bench.measure(OP, case, mode, f"fastlab-pps{n}", run, floor_bytes=nbytes,
                      floor_flops=flops, shape=shape)


def _name(batch, heads, length):
    return f"B{batch}-H{heads}-T{length}-D{HEAD_DIM}-bf16"


def _filled_cache(batch, heads, length, lengths):
    cache = KVCache(batch, heads, length, HEAD_DIM, DTYPE, "cuda")
    shape = (batch, heads, length, HEAD_DIM)
    cache.append(randn(shape, DTYPE, "cuda", seed=1), randn(shape, DTYPE, "cuda", seed=2),
                 torch.tensor(lengths, device="cuda"))
    return cache


def _decode_floor(heads, lengths):
    live = 2 * heads * sum(lengths) * HEAD_DIM * DTYPE.itemsize
    io = 2 * len(lengths) * heads * HEAD_DIM * DTYPE.itemsize  # q in, out out
    return live + io, 4.0 * heads * sum(lengths) * HEAD_DIM


def _check(out, cache_k, cache_v, lengths, q, k_new=None, v_new=None):
    expected = attention_with_kvcache_ref(q, cache_k, cache_v, lengths, k_new, v_new)
    assert_close(out, expected, scale=2.0)


@pytest.mark.parametrize("batch,heads,length", DECODE)
@pytest.mark.parametrize("mode", ["fwd", "append"])
def test_decode_full_cache(bench, batch, heads, length, mode):
    live = length - 1 if mode == "append" else length  # append mode adds the last token
    cache = _filled_cache(batch, heads, length, [live] * batch)
    q = randn((batch, heads, 1, HEAD_DIM), DTYPE, "cuda", seed=3)
    kv = randn((batch, heads, 1, HEAD_DIM), DTYPE, "cuda", seed=4)
    k_buf, v_buf = cache.k_buffer, cache.v_buffer
    full = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    nbytes, flops = _decode_floor(heads, [length] * batch)
    shape = {"batch": batch, "heads": heads, "cache_len": length, "head_dim": HEAD_DIM}

    if mode == "fwd":
        fastlab = lambda: attention_with_kvcache(q, cache)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k_buf, v_buf)  # noqa: E731
    else:
        def fastlab():
            out = attention_with_kvcache(q, cache, kv, kv)
            cache.truncate(length - 1)
            return out

        def sdpa():
            k_buf[:, :, length - 1:] = kv
            v_buf[:, :, length - 1:] = kv
            return F.scaled_dot_product_attention(q, k_buf, v_buf)

    out = fastlab()
    _check(out, k_buf, v_buf, full, q)
    _check(sdpa(), k_buf, v_buf, full, q)
    bench.measure(OP, _name(batch, heads, length), mode, "fastlab", fastlab, floor_bytes=nbytes,
                  floor_flops=flops, shape=shape)
    bench.measure(OP, _name(batch, heads, length), mode, "sdpa", sdpa, floor_bytes=nbytes,
                  floor_flops=flops, shape=shape)
    if mode == "fwd":
        _measure_split_variants(bench, _name(batch, heads, length), mode, fastlab,
                                lambda out: _check(out, k_buf, v_buf, full, q), nbytes, flops,
                                shape)
        _flash_attn_peer(bench, q, k_buf, v_buf, full, mode, _name(batch, heads, length),
                         nbytes, flops, shape)


def _flash_attn_peer(bench, q, k_buf, v_buf, lengths, mode, case, nbytes, flops, shape):
    flash_attn = optional_import("flash_attn")
    # flash-attn keeps caches as (B, S, H, D): a one-off copy outside the timed region.
    k_bshd = k_buf.transpose(1, 2).contiguous()
    v_bshd = v_buf.transpose(1, 2).contiguous()
    q_bshd = q.transpose(1, 2).contiguous()

    def run():
        return flash_attn.flash_attn_with_kvcache(q_bshd, k_bshd, v_bshd,
                                                  cache_seqlens=lengths, causal=True)

    _check(run().transpose(1, 2), k_buf, v_buf, lengths, q)
    bench.measure(OP, case, mode, "flash_attn", run, floor_bytes=nbytes, floor_flops=flops,
                  shape=shape)


@pytest.mark.parametrize("batch,heads,length", DECODE)
def test_decode_ragged_cache(bench, batch, heads, length):
    g = torch.Generator().manual_seed(batch * length)
    lengths = torch.randint(1, length + 1, (batch,), generator=g).tolist()
    cache = _filled_cache(batch, heads, length, lengths)
    q = randn((batch, heads, 1, HEAD_DIM), DTYPE, "cuda", seed=3)
    lens = cache.lengths.clone()
    mask = (torch.arange(length, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
    k_buf, v_buf = cache.k_buffer, cache.v_buffer
    # The padded-cache peer needs its dead slots zeroed: the cache leaves them uninitialised,
    # and a NaN bit pattern there leaks through SDPA's mask as 0 * NaN (seen on an H100).
    # fastlab never reads them; zeroing happens outside the timed region.
    for b, n in enumerate(lengths):
        k_buf[b, :, n:] = 0
        v_buf[b, :, n:] = 0
    nbytes, flops = _decode_floor(heads, lengths)
    shape = {"batch": batch, "heads": heads, "cache_len": length, "head_dim": HEAD_DIM,
             "lengths": lengths}
    case = _name(batch, heads, length) + "-ragged"

    fastlab = lambda: attention_with_kvcache(q, cache)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask)  # noqa: E731
    _check(fastlab(), k_buf, v_buf, lens, q)
    _check(sdpa(), k_buf, v_buf, lens, q)
    bench.measure(OP, case, "fwd", "fastlab", fastlab, floor_bytes=nbytes, floor_flops=flops,
                  shape=shape)
    bench.measure(OP, case, "fwd", "sdpa-padded", sdpa, floor_bytes=nbytes, floor_flops=flops,
                  shape=shape)
    _measure_split_variants(bench, case, "fwd", fastlab,
                            lambda out: _check(out, k_buf, v_buf, lens, q), nbytes, flops, shape)
    _flash_attn_peer(bench, q, k_buf, v_buf, lens, "fwd", case, nbytes, flops, shape)


# ----------------------------------------------------------------------------- generation
GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 3840, 256
GPT_CONFIG = GPTConfig(vocab_size=32768, block_size=4096, n_layer=12, n_head=16, d_model=2048)


class _ConcatDecoder:
    """The plain PyTorch loop: each layer's keys/values are concatenated at every step."""

    def __init__(self, model: GPT):
        self.model = model

    def _layers(self, x, pos, causal):
        m = self.model
        x = x + m.pos_emb(pos)
        b, s, _ = x.shape
        for i, block in enumerate(m.blocks):
            a = block.attn
            h = block.ln1(x)
            q = a.q_proj(h).view(b, s, a.n_head, a.head_dim).transpose(1, 2)
            k, v = a.kv_proj(h).view(b, s, 2, a.n_kv_head, a.head_dim).unbind(2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if self.kv[i] is not None:
                k = torch.cat([self.kv[i][0], k], dim=2)
                v = torch.cat([self.kv[i][1], v], dim=2)
            self.kv[i] = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = x + a.out_proj(y.transpose(1, 2).reshape(b, s, -1))
            x = x + block.mlp(block.ln2(x))
        return m.head(m.ln_f(x[:, -1]))

    def prefill(self, idx):
        self.kv = [None] * len(self.model.blocks)
        self.length = idx.shape[1]
        return self._layers(self.model.tok_emb(idx),
                            torch.arange(self.length, device=idx.device), True)

    def decode(self, token):
        pos = torch.tensor([self.length], device=token.device)
        self.length += 1
        return self._layers(self.model.tok_emb(token[:, None]), pos, False)

    @torch.no_grad()
    def generate(self, idx, n_new):
        logits = self.prefill(idx)
        out = []
        for step in range(n_new):
            token = logits.argmax(-1)
            out.append(token)
            if step + 1 < n_new:
                logits = self.decode(token)
        return torch.stack(out, 1)


@torch.no_grad()
def test_generate(bench):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(GPT_CONFIG).to(DTYPE).eval()
    prompts = torch.randint(0, GPT_CONFIG.vocab_size, (GEN_BATCH, GEN_PROMPT), device="cuda")
    baseline = _ConcatDecoder(model)

    # Same logits after the prefill and after one decoded token (teacher-forced).
    caches = model.new_kv_caches(GEN_BATCH, GEN_PROMPT + 1)
    ours = model(prompts, caches=caches, logits_at=torch.full((GEN_BATCH,), GEN_PROMPT - 1,
                                                              device="cuda"))[0][:, -1]
    theirs = baseline.prefill(prompts)
    assert_close(ours, theirs, scale=8.0, msg="prefill logits")
    token = theirs.argmax(-1)
    assert_close(model(token[:, None], caches=caches)[0][:, -1], baseline.decode(token),
                 scale=8.0, msg="decode logits")
    del caches

    params = sum(p.numel() for p in model.parameters()) * DTYPE.itemsize
    kv_per_token = 2 * GPT_CONFIG.n_layer * GPT_CONFIG.d_model * DTYPE.itemsize * GEN_BATCH
    nbytes = sum(params + kv_per_token * (GEN_PROMPT + t) for t in range(GEN_NEW))
    shape = {"batch": GEN_BATCH, "prompt": GEN_PROMPT, "new_tokens": GEN_NEW,
             "tokens": GEN_BATCH * GEN_NEW, "config": vars(GPT_CONFIG)}
    case = f"gpt-L{GPT_CONFIG.n_layer}-d{GPT_CONFIG.d_model}-B{GEN_BATCH}-P{GEN_PROMPT}-N{GEN_NEW}"
    bench.measure(OP, case, "generate", "fastlab", lambda: generate(model, prompts, GEN_NEW),
                  floor_bytes=nbytes, shape=shape, warmup=1, rep=1)
    bench.measure(OP, case, "generate", "torch-concat",
                  lambda: baseline.generate(prompts, GEN_NEW), floor_bytes=nbytes, shape=shape,
                  warmup=1, rep=1)
