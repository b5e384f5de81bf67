"""Segment pooling (fastlab._C) against torch.segment_reduce, index_add and torch_scatter.

Cases (bf16, unit lengths uniform in 1..max_len, mean pooling):
- ``headline``: 4.19M rows x 256 in 524K units of 1-15 rows; modes fwd and full (fwd+bwd).
- ``level_D{32,48,64,96,128}``: the hierarchical autoencoder's level shapes (units of at
  most 16, 16, 6, 3, 4 rows), 256 MiB of x each; fwd and full.
- ``unpool_D*``: the decoder side at the same shapes, ``base + broadcast(y)``; fwd and full.
- ``hierarchy``: characters -> words -> sentences -> paragraphs (D = 128) in one call.

Floors count the bytes each op must move once: forward reads x and writes the pooled rows,
backward reads their gradient and writes x's. Every provider's output and gradient are
checked against the reference before it is timed.

``python -m benches.bench_segment_pool`` times the CPU kernels against torch.segment_reduce
on the same shapes scaled down (no GPU needed).
"""
import functools
import time

import pytest
import torch

from benches.conftest import optional_import
from fastlab.ops.segment_pool import (
    hierarchical_pool,
    offsets_from_lengths,
    segment_broadcast,
    segment_broadcast_ref,
    segment_ids,
    segment_pool,
    segment_pool_ref,
    staged_kernel_tuning,
)
from fastlab.testing import assert_close

OP = "segment_pool"
DTYPE = torch.bfloat16
HEADLINE = dict(segments=524288, features=256, max_len=15)
# The log's levels: vector size and the most rows a unit of that level holds.
LEVELS = [(32, 16), (48, 16), (64, 6), (96, 3), (128, 4)]
LEVEL_BYTES = 1 << 28  # 256 MiB of x per level case: far beyond L2, a few ms of HBM traffic
HIERARCHY = dict(characters=1 << 22, features=128, max_lens=(16, 16, 6))
PROVIDERS = ["fastlab", "segment_reduce", "index_add", "torch_scatter"]
# Pooling kernel variants beside the default (staged: 40 KiB buffer, 32 KiB windows, 2 segments
# a group for rows of 32 or more vectors, the block's offsets in shared memory), forward
# only, picked through staged_kernel_tuning (buffer, window KiB, segments a group, threads).
VARIANTS = {
    "fastlab-registers": dict(buffer_kib=0),
    "fastlab-b24-w16": dict(buffer_kib=24, window_kib=16),
    # at least 2 or 4 segments a group (smaller blocks): evens out a warp's groups
    "fastlab-segs2": dict(segs_per_group=2),
    "fastlab-segs4": dict(segs_per_group=4),
    # each group reads its segments' bounds from global memory (before: staged in shared)
    "fastlab-global-offsets": dict(stage_offsets=0),
    # smaller blocks with smaller buffers: more of them an SM, each a shorter round trip
    "fastlab-t128-b24-w16": dict(threads=128, buffer_kib=24, window_kib=16),
    "fastlab-t128-b16-w12": dict(threads=128, buffer_kib=16, window_kib=12),
}


def _lengths(segments, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, max_len + 1, (segments,), generator=g)


def _ragged(segments, features, max_len, seed, device):
    offsets = offsets_from_lengths(_lengths(segments, max_len, seed)).to(device)
    total = int(offsets[-1])  # host sync: setup only
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(total, features, generator=g, device=device).to(DTYPE)
    return x, offsets


def _case_shape(name):
    """(segments, features, max_len) of a pooling case."""
    if name == "headline":
        return HEADLINE["segments"], HEADLINE["features"], HEADLINE["max_len"]
    features = int(name[len("level_D"):])
    max_len = dict(LEVELS)[features]
    rows = LEVEL_BYTES // (features * DTYPE.itemsize)
    return rows * 2 // (max_len + 1), features, max_len  # mean unit length (max_len + 1) / 2


@functools.lru_cache(maxsize=1)  # one case resident at a time: the headline x is 2.1 GB
def _pool_case(name):
    segments, features, max_len = _case_shape(name)
    x, offsets = _ragged(segments, features, max_len, seed=features, device="cuda")
    total = x.shape[0]
    grad = torch.randn(segments, features, device="cuda").to(DTYPE)
    lengths = (offsets[1:] - offsets[:-1]).clamp(min=1)
    expected = segment_pool_ref(x, offsets, "mean")
    expected_grad = segment_broadcast_ref((grad.float() / lengths[:, None]).to(DTYPE), offsets,
                                          total)
    return dict(x=x, offsets=offsets, grad=grad, expected=expected, expected_grad=expected_grad,
                ids=segment_ids(offsets, total), counts=lengths[:, None].to(DTYPE))


def _mean_fn(provider, case):
    x, offsets, ids, counts = case["x"], case["offsets"], case["ids"], case["counts"]
    if provider == "fastlab":
        return lambda x: segment_pool(x, offsets, "mean")
    if provider in VARIANTS:
        return functools.partial(_pool_variant, VARIANTS[provider], offsets)
    if provider == "segment_reduce":
        return lambda x: torch.segment_reduce(x, "mean", offsets=offsets, axis=0)
    if provider == "index_add":
        zeros = x.new_zeros(counts.shape[0], x.shape[1])
        return lambda x: zeros.index_add(0, ids, x) / counts
    scatter = optional_import("torch_scatter")
    return lambda x: scatter.segment_csr(x, offsets, reduce="mean")


def _pool_variant(tuning, offsets, x):
    with staged_kernel_tuning(**tuning):
        return segment_pool(x, offsets, "mean")


def _measure_pool(bench, case_name, provider):
    case = _pool_case(case_name)
    x, grad = case["x"], case["grad"]
    pool = _mean_fn(provider, case)
    xg = x.detach().requires_grad_()
    out = pool(xg)
    (gx,) = torch.autograd.grad(out, xg, grad)
    assert_close(out, case["expected"], msg=f"{provider} forward")
    assert_close(gx, case["expected_grad"], msg=f"{provider} backward")
    del out, gx
    rows, segments, features = x.shape[0], grad.shape[0], x.shape[1]
    pooled_bytes = (rows + segments) * features * x.element_size()
    shape = dict(rows=rows, segments=segments, features=features, dtype=str(DTYPE))
    bench.measure(OP, case_name, "fwd", provider, lambda: pool(x),
                  floor_bytes=pooled_bytes, shape=shape)
    if provider in VARIANTS:
        return  # the backward does not depend on the pooling variant
    bench.measure(OP, case_name, "full", provider,
                  lambda: torch.autograd.grad(pool(xg), xg, grad),
                  floor_bytes=2 * pooled_bytes, shape=shape)


@pytest.mark.parametrize("provider", PROVIDERS + list(VARIANTS))
def test_headline(bench, provider):
    _measure_pool(bench, "headline", provider)


@pytest.mark.parametrize("provider", ["fastlab", "segment_reduce", "torch_scatter",
                                      *VARIANTS])
@pytest.mark.parametrize("features", [features for features, _ in LEVELS])
def test_levels(bench, features, provider):
    _measure_pool(bench, f"level_D{features}", provider)


@pytest.mark.parametrize("features", [features for features, _ in LEVELS])
def test_levels_copy_reference(bench, features):
    """torch's device copy of the same x: what a plain stream of these bytes reaches at this
    size (its own floor: read and write x once), beside the pooling rows."""
    x = _pool_case(f"level_D{features}")["x"]
    out = torch.empty_like(x)
    out.copy_(x)
    assert torch.equal(out, x)
    shape = dict(rows=x.shape[0], features=features, dtype=str(DTYPE))
    bench.measure("copy", f"level_D{features}", "fwd", "torch-copy", lambda: out.copy_(x),
                  floor_bytes=2 * x.numel() * x.element_size(), shape=shape)


@pytest.mark.parametrize("provider", ["fastlab", "index_select", "repeat_interleave"])
@pytest.mark.parametrize("features", [features for features, _ in LEVELS])
def test_unpool(bench, features, provider):
    case = _pool_case(f"level_D{features}")
    offsets, ids = case["offsets"], case["ids"]
    base = case["x"]
    rows, segments = base.shape[0], offsets.shape[0] - 1
    y = case["expected"]
    if provider == "fastlab":
        unpool = lambda y, base: segment_broadcast(y, offsets, rows, base=base)  # noqa: E731
    elif provider == "index_select":
        unpool = lambda y, base: base + y.index_select(0, ids)  # noqa: E731
    else:
        lengths = offsets[1:] - offsets[:-1]
        unpool = lambda y, base: base + torch.repeat_interleave(  # noqa: E731
            y, lengths, dim=0, output_size=rows)
    assert_close(unpool(y, base), segment_broadcast_ref(y, offsets, rows, base=base),
                 msg=f"{provider} unpool")
    yg, bg = y.detach().requires_grad_(), base.detach().requires_grad_()
    grad = torch.randn_like(base)
    # forward reads y and base, writes out; backward reads grad and writes y's (base's
    # gradient is grad itself)
    fwd_bytes = (segments + 2 * rows) * features * base.element_size()
    bwd_bytes = (rows + segments) * features * base.element_size()
    shape = dict(rows=rows, segments=segments, features=features, dtype=str(DTYPE))
    bench.measure("segment_broadcast", f"unpool_D{features}", "fwd", provider,
                  lambda: unpool(y, base), floor_bytes=fwd_bytes, shape=shape)
    bench.measure("segment_broadcast", f"unpool_D{features}", "full", provider,
                  lambda: torch.autograd.grad(unpool(yg, bg), (yg, bg), grad),
                  floor_bytes=fwd_bytes + bwd_bytes, shape=shape)


def _covering_offsets(units_below, max_len, seed):
    """Offsets of units of 1..max_len rows that cover exactly `units_below` rows."""
    lengths = _lengths(units_below, max_len, seed)
    ends = lengths.cumsum(0)
    count = int((ends < units_below).sum()) + 1
    lengths = lengths[:count]
    lengths[-1] -= int(ends[count - 1]) - units_below
    return offsets_from_lengths(lengths).cuda()


@functools.lru_cache(maxsize=1)
def _hierarchy_case():
    rows = HIERARCHY["characters"]
    x = torch.randn(rows, HIERARCHY["features"], device="cuda").to(DTYPE)
    level_offsets = []
    for level, max_len in enumerate(HIERARCHY["max_lens"]):
        level_offsets.append(_covering_offsets(rows, max_len, seed=level))
        rows = level_offsets[-1].shape[0] - 1
    return x, level_offsets


@pytest.mark.parametrize("provider", ["fastlab", "segment_reduce"])
def test_hierarchy(bench, provider):
    x, level_offsets = _hierarchy_case()
    if provider == "fastlab":
        run = lambda x: hierarchical_pool(x, level_offsets, "mean")  # noqa: E731
    else:
        def run(x):
            levels = []
            for offsets in level_offsets:
                x = torch.segment_reduce(x, "mean", offsets=offsets, axis=0)
                levels.append(x)
            return levels
    expected = x
    for offsets, got in zip(level_offsets, run(x)):
        expected = segment_pool_ref(expected, offsets, "mean")
        assert_close(got, expected, scale=2, msg=f"{provider} level")
    sizes = [x.shape[0]] + [offsets.shape[0] - 1 for offsets in level_offsets]
    level_bytes = sum(a + b for a, b in zip(sizes, sizes[1:])) * x.shape[1] * x.element_size()
    xg = x.detach().requires_grad_()
    grads = [torch.randn(n, x.shape[1], device="cuda").to(DTYPE) for n in sizes[1:]]
    shape = dict(levels=sizes, features=x.shape[1], dtype=str(DTYPE))
    bench.measure(OP, "hierarchy", "fwd", provider, lambda: run(x), floor_bytes=level_bytes,
                  shape=shape)
    bench.measure(OP, "hierarchy", "full", provider,
                  lambda: torch.autograd.grad(run(xg), xg, grads),
                  floor_bytes=2 * level_bytes, shape=shape)


def _cpu_time_ms(fn, repeats=7):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def cpu_comparison(scale=16):
    """CPU forward: fastlab's C++ kernel vs torch.segment_reduce, shapes divided by `scale`."""
    print(f"CPU forward, {DTYPE}, {torch.get_num_threads()} threads, best of 7 (ms)")
    for name in ["headline"] + [f"level_D{features}" for features, _ in LEVELS]:
        segments, features, max_len = _case_shape(name)
        x, offsets = _ragged(segments // scale, features, max_len, seed=features, device="cpu")
        for reduce in ("mean", "max"):
            ours = _cpu_time_ms(lambda: segment_pool(x, offsets, reduce))
            theirs = _cpu_time_ms(lambda: torch.segment_reduce(x, reduce, offsets=offsets, axis=0))
            print(f"{name:>12} {reduce:>4} rows={x.shape[0]:>8} fastlab {ours:8.2f}  "
                  f"segment_reduce {theirs:8.2f}  speed-up {theirs / ours:5.2f}x")


if __name__ == "__main__":
    cpu_comparison()
