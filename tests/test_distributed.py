"""Two gloo processes under torchrun match one process with the same global batch,
checkpoints move between world sizes, and FSDP skips updates with inf/NaN gradients."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastlab.train import checkpoint

ARGS = ["task.n_digits=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
        "train.batch_size=16", "eval.samples=64", "log.progress=false", "train.device=cpu",
        "log.nvml=false", "log.every=1", "eval.every=1000", "checkpoint.every=6",
        "optim.schedule=constant", "optim.warmup_steps=5"]  # lr independent of train.steps


def _run(tmp_path, name, nproc, *extra, entry=("-m", "fastlab.train")):
    if nproc == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *entry]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd + ARGS + [f"log.out_dir={tmp_path}", f"log.name={name}", *extra],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / name / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def _close(a, b, steps):
    for s in steps:
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(b[s])), (s, a[s], b[s])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_and_checkpoints_cross_world_sizes(tmp_path, mode):
    single = _run(tmp_path, "single", 1, "train.steps=12")
    two = _run(tmp_path, f"two-{mode}", 2, "train.steps=12", f"train.dist={mode}")
    _close(two, single, range(1, 13))

    # saved by 2 ranks at step 12, resumed by 1 for 6 more steps; the reverse likewise
    more_on_one = _run(tmp_path, f"two-{mode}", 1, "train.steps=18")
    more_single = _run(tmp_path, "single", 2, "train.steps=18", f"train.dist={mode}")
    reference = _run(tmp_path, "reference", 1, "train.steps=18")
    _close(more_on_one, reference, range(13, 19))
    _close(more_single, reference, range(13, 19))
    ckpt = checkpoint.load(str(tmp_path / f"two-{mode}" / "ckpt-00000018.pt"))
    assert ckpt["step"] == 18


# the third forward's logits pass back inf gradients while its loss stays finite
INF_GRADIENT = """
import sys

import torch

from fastlab.models import gpt
from fastlab.train.config import build_config
from fastlab.train.loop import train

forward, calls = gpt.GPT.forward, [0]


def inf_gradient(self, idx, targets=None):
    logits, loss = forward(self, idx, targets)
    calls[0] += 1
    if calls[0] == 3:
        logits.register_hook(lambda g: torch.full_like(g, float("inf")))
    return logits, loss


gpt.GPT.forward = inf_gradient
train(build_config(overrides=sys.argv[1:]))
"""


@pytest.mark.slow
def test_fsdp_skips_an_update_with_an_infinite_gradient_norm(tmp_path):
    script = tmp_path / "inf_gradient.py"
    script.write_text(INF_GRADIENT)
    losses = _run(tmp_path, "run", 2, "train.steps=6", "train.dist=fsdp", entry=(str(script),))
    assert all(math.isfinite(v) for v in losses.values()), losses
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        events = [r for r in map(json.loads, f) if r["kind"] == "event"]
    assert [(e["step"], e["skipped"]) for e in events if "skipped" in e] == [(3, 1)]
    ckpt = checkpoint.load(str(tmp_path / "run" / "ckpt-00000006.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
