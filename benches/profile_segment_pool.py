"""One pooling call at a level shape under Nsight Compute (or alone): ``python -m
benches.profile_segment_pool FEATURES MAX_LEN`` runs a warm-up and one profiled call of
fastlab's mean pooling over 256 MiB of bf16 rows (the bench's level case)."""
import sys

import torch

from fastlab.ops.segment_pool import offsets_from_lengths, segment_pool


def main(features=128, max_len=4):
    rows = (1 << 28) // (features * 2)
    segments = rows * 2 // (max_len + 1)
    g = torch.Generator().manual_seed(features)
    lengths = torch.randint(1, max_len + 1, (segments,), generator=g)
    offsets = offsets_from_lengths(lengths).cuda()
    x = torch.randn(int(offsets[-1]), features, device="cuda").to(torch.bfloat16)
    for _ in range(3):
        segment_pool(x, offsets, "mean")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    segment_pool(x, offsets, "mean")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
