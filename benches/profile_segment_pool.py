"""One pooling call of a bench case under Nsight Compute (or alone):
``python -m benches.profile_segment_pool [CASE]`` (``level_D128`` by default; any case of
benches/bench_segment_pool.py: ``headline``, ``level_D32`` ... ``level_D128``) runs a warm-up
and one call of fastlab's mean pooling between cudaProfilerStart/Stop, so that
``ncu --profile-from-start off`` profiles that call alone."""
import sys

import torch

from benches.bench_segment_pool import _case_shape, _ragged
from fastlab.ops.segment_pool import segment_pool


def main(case="level_D128"):
    segments, features, max_len = _case_shape(case)
    x, offsets = _ragged(segments, features, max_len, seed=features, device="cuda")
    for _ in range(3):
        segment_pool(x, offsets, "mean")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    segment_pool(x, offsets, "mean")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(*sys.argv[1:])
