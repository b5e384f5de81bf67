"""The trainer's interfaces: a task of one's own through ``task.name=module:Class``, per-task
config keys, the device-side skip protocol and in-place rollback, and (on a GPU) the whole
step replayed from one CUDA graph."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastlab.optim import AdamW
from fastlab.optim.schedules import lr_multiplier
from fastlab.tasks import LossOutput, Task, TaskConfig, counter_uniform
from fastlab.train import checkpoint
from fastlab.train.config import build_config, help_text
from fastlab.train.guard import SpikeGuard
from fastlab.train.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = f"{__name__}:ToyRegression"


@dataclass
class ToyConfig(TaskConfig):
    name: str = TOY
    #: input features
    dim: int = 6

    def __post_init__(self):
        if self.dim < 1:
            raise ValueError(f"task.dim must be >= 1, got {self.dim}")


class ToyRegression(Task):
    """Two linear heads fit y and -y of a fixed linear map: two sub-losses, one of them with
    its own count."""

    name = "toy"
    Config = ToyConfig
    metric = "neg_mse"

    def build_model(self, model_cfg) -> nn.Module:
        return nn.Linear(self.cfg.dim, 2)

    def _weights(self, device):
        w = counter_uniform(99, 0, torch.tensor(0, device=device), (self.cfg.dim,), 1000, device)
        return w.float() / 1000 - 0.5

    def batch(self, step, batch_size, device, seed=0):
        x = counter_uniform(seed, 0, step, (batch_size, self.cfg.dim), 1 << 16, device)
        x = x.float() / (1 << 15) - 1
        return {"x": x, "y": x @ self._weights(device)}

    def loss(self, model, batch):
        out = model(batch["x"]).float()
        err0 = ((out[:, 0] - batch["y"]) ** 2).sum()
        err1 = ((out[:, 1] + batch["y"]) ** 2).sum()
        n = torch.tensor(batch["x"].shape[0], device=out.device)
        return LossOutput(err0 + err1, n, {"mse/0": err0, "mse/1": (err1, n)})

    @torch.no_grad()
    def evaluate(self, model, n_samples, device):
        batch = self.batch(torch.tensor(10 ** 6, device=device), n_samples, device, seed=1)
        mse = float(((model(batch["x"])[:, 0] - batch["y"]) ** 2).mean())
        return {"neg_mse": -mse, "mse": mse}


ARGS = [f"task.name={TOY}", "train.device=cpu", "log.nvml=false", "log.progress=false",
        "train.batch_size=32", "optim.lr=0.05", "optim.warmup_steps=0", "eval.samples=256"]


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_a_task_from_a_test_file_trains_through_the_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "fastlab.train", *ARGS, "train.steps=150", "log.every=50",
           "eval.every=150", "task.dim=5", f"log.out_dir={tmp_path}", "log.name=toy"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = str(tmp_path / "toy")
    train_rows = _records(run_dir, "train")
    assert [r["step"] for r in train_rows] == [50, 100, 150]
    for r in train_rows:  # the sub-losses are logged under their own names
        assert r["loss"] == pytest.approx(r["mse/0"] + r["mse/1"], rel=1e-6)
    assert train_rows[-1]["loss"] < 0.05 * train_rows[0]["loss"]
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert summary["final"]["mse"] < 0.05 and summary["best"] == summary["final"]["neg_mse"]
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["task"]["dim"] == 5


def test_task_keys_help_and_errors_follow_the_selected_task():
    cfg = build_config(overrides=[f"task.name={TOY}", "task.dim=3"])
    assert isinstance(cfg.task, ToyConfig) and cfg.task.dim == 3
    text = help_text([f"task.name={TOY}"])
    assert "task.dim" in text and "task.n_digits" not in text
    assert "task.n_digits" in help_text([])
    with pytest.raises(ValueError, match="did you mean task.dim"):
        build_config(overrides=[f"task.name={TOY}", "task.dimm=3"])
    with pytest.raises(ValueError, match="task 'toy'"):
        build_config(overrides=[f"task.name={TOY}", "task.n_digits=3"])
    with pytest.raises(ValueError, match="task.dim must be >= 1"):
        build_config(overrides=[f"task.name={TOY}", "task.dim=0"])
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):
        build_config(overrides=["task.name=nosuch"])
    with pytest.raises(ValueError, match="cannot import"):
        build_config(overrides=["task.name=no_such_module:Task"])
    with pytest.raises(ValueError, match="no Task subclass 'Missing'"):
        build_config(overrides=[f"task.name={__name__}:Missing"])


def test_cli_help_of_a_task_and_a_bad_task_key_exit_cleanly():
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastlab.train", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=120)
    out = run(f"task.name={TOY}", "--help")
    assert out.returncode == 0 and "task.dim" in out.stdout
    out = run(f"task.name={TOY}", "task.dimm=2")
    assert out.returncode == 2 and out.stderr.startswith("error:") and "task.dim" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("fused", [True, False], ids=["fastlab-adamw", "torch-fused-adamw"])
def test_the_skip_flag_leaves_weights_and_state_untouched(tmp_path, fused):
    from fastlab.train import distributed
    from fastlab.train.stepper import Stepper

    cfg = build_config(overrides=ARGS + [f"log.out_dir={tmp_path}"])
    task = ToyRegression(cfg.task)
    model = task.build_model(cfg.model)
    opt = AdamW(model.parameters(), lr=0.1, max_grad_norm=1.0) if fused else \
        torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = SpikeGuard(cfg.guard, torch.device("cpu"))
    stepper = Stepper(task, model, opt, cfg, torch.device("cpu"), "fp32",
                      distributed.DistInfo(), guard, compile_on=False, graphs=False)
    stepper.run(0)  # a good step creates the optimizer state
    before = [t.clone() for t in list(model.parameters()) + [
        v for s in opt.state.values() for v in s.values()]]
    norm, skipped = stepper._update(torch.tensor(1.0), torch.tensor(True))
    assert float(skipped) == 1.0
    after = list(model.parameters()) + [v for s in opt.state.values() for v in s.values()]
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    norm, skipped = stepper._update(torch.tensor(1.0), torch.tensor(False))
    assert float(skipped) == 0.0 and torch.isfinite(norm)
    assert not torch.equal(before[0], model.weight)


def test_rollback_restores_in_place_and_lowers_the_lr():
    cfg = build_config(overrides=["guard.lr_backoff=0.25"])
    guard = SpikeGuard(cfg.guard, torch.device("cpu"))
    tensors = [torch.randn(3, 4), torch.randn(5)]
    addresses = [t.data_ptr() for t in tensors]
    saved = [t.clone() for t in tensors]
    guard.take_snapshot(7, tensors)
    for t in tensors:
        t.add_(1.0)
    guard.roll_back(tensors)
    assert [t.data_ptr() for t in tensors] == addresses  # a captured graph stays valid
    assert all(torch.equal(a, b) for a, b in zip(tensors, saved))
    assert float(guard.lr_scale) == 0.25 and guard.rollbacks == 1
    with pytest.raises(RuntimeError, match="changed shape"):
        guard.roll_back([torch.zeros(2)])


@pytest.mark.parametrize("name", ["linear", "cosine", "inverse_sqrt", "constant"])
def test_the_schedule_on_the_device_counter_equals_the_host_schedule(name):
    f = lr_multiplier(name, 10, 110, 0.1)
    for step in (0, 9, 10, 57, 110, 300):
        assert float(f(torch.tensor(step))) == f(step)


def test_resume_after_a_crash_is_bit_exact_for_a_task_of_ones_own(tmp_path):
    steps = ARGS + ["train.steps=24", "log.every=1", "checkpoint.every=8", "eval.every=100",
                    f"log.out_dir={tmp_path}"]
    train(build_config(overrides=steps), run_dir=str(tmp_path / "clean"))

    class Crash(Exception):
        pass

    def crash(step, batch):
        if step == 13:
            raise Crash
        return batch

    with pytest.raises(Crash):
        train(build_config(overrides=steps), run_dir=str(tmp_path / "crash"), batch_hook=crash)
    train(build_config(overrides=steps), run_dir=str(tmp_path / "crash"))
    clean, resumed = (_records(str(tmp_path / d), "train") for d in ("clean", "crash"))
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for a, b in zip(clean, resumed):
        assert (a["loss"], a["mse/0"], a["grad_norm"]) == (b["loss"], b["mse/0"], b["grad_norm"])


# --- GPU: the whole step in one CUDA graph ------------------------------------------------
GPU_ARGS = ["task.n_digits=3", "model.n_layer=2", "model.d_model=64", "train.batch_size=128",
            "log.nvml=false", "log.progress=false", "eval.every=1000", "log.every=1",
            "train.device=cuda"]


@pytest.mark.gpu
def test_graph_replay_trains_as_the_eager_step_and_resumes(tmp_path):
    args = GPU_ARGS + ["train.steps=40", "checkpoint.every=20", f"log.out_dir={tmp_path}"]
    eager = train(build_config(overrides=args + ["train.cuda_graphs=off"]),
                  run_dir=str(tmp_path / "eager"))
    graph = train(build_config(overrides=args + ["train.cuda_graphs=on"]),
                  run_dir=str(tmp_path / "graph"))
    assert graph["cuda_graphs"] and not eager["cuda_graphs"]
    a, b = (_records(str(tmp_path / d), "train") for d in ("eager", "graph"))
    for x, y in zip(a, b):  # the same kernels: bf16 rounding is the only difference allowed
        assert x["loss"] == pytest.approx(y["loss"], rel=2e-2), (x["step"], x["loss"], y["loss"])
    # resumed at step 20 (three eager steps, then a capture again) the run goes on as it
    # would have: on the GPU eager steps and replays are not bit-identical (H200: 1.1e-5
    # relative at step 28 of this run), so the check is to 1e-4
    os.remove(checkpoint.latest(str(tmp_path / "graph")))
    train(build_config(overrides=args + ["train.cuda_graphs=on"]), run_dir=str(tmp_path / "graph"))
    c = _records(str(tmp_path / "graph"), "train")
    assert [r["step"] for r in c] == list(range(1, 41))
    for x, y in zip(b[20:], c[20:]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), x["step"]


@pytest.mark.gpu
def test_a_curriculum_change_is_followed_by_the_captured_step(tmp_path, monkeypatch):
    from fastlab.tasks.addition import Addition

    real = Addition.evaluate
    monkeypatch.setattr(Addition, "evaluate",
                        lambda self, *a, **k: {**real(self, *a, **k), "exact_match": 1.0})
    seen = []
    batch = Addition.batch

    def recording(self, step, batch_size, device, seed=0):
        out = batch(self, step, batch_size, device, seed)
        seen.append(out["inputs"])  # eager steps only: a replay does not call Python
        return out

    monkeypatch.setattr(Addition, "batch", recording)
    args = GPU_ARGS + ["task.curriculum_start=1", "task.curriculum_threshold=0.5",
                       "eval.every=10", "train.steps=30", "train.compile=off",
                       "train.cuda_graphs=on", f"log.out_dir={tmp_path}"]
    train(build_config(overrides=args), run_dir=str(tmp_path / "run"))
    evals = _records(str(tmp_path / "run"), "eval")
    assert [e["digits"] for e in evals] == [1, 2, 3]
    # three eager steps and a capture per level: 3 levels x 4 Python calls
    assert len(seen) == 12
    assert (seen[0][:, 1:3] == 0).all() and (seen[4][:, 2] == 0).all()
    assert (seen[8][:, 2] != 0).any()
