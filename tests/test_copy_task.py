"""The copy task: targets of every mode, batches from (seed, step) alone, held-out rows kept
out, the length curricula, learning through the trainer and resuming at the level."""
import json
import os

import pytest
import torch

from fastlab.tasks import build_task
from fastlab.tasks.copy import CDF_ONE, IGNORE, Copy, CopyConfig
from fastlab.train import checkpoint
from fastlab.train.config import ModelConfig, build_config
from fastlab.train.loop import train

CPU = torch.device("cpu")
TINY = ["task.name=copy", "train.device=cpu", "log.nvml=false", "log.progress=false",
        "model.n_layer=1", "model.n_head=2", "model.d_model=32"]


def _task(**kwargs) -> Copy:
    return Copy(CopyConfig(**kwargs))


def _batch(task, step, batch_size, seed=0):
    return task.batch(torch.tensor(step), batch_size, CPU, seed)


def _expected(row, mode, shift):
    """The target of one row (a list of symbols) in plain Python."""
    n = len(row)
    if mode == "copy":
        return list(row)
    if mode == "flip":
        return row[::-1]
    return [row[(i - shift) % n] for i in range(n)]


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("mode, shift", [("copy", 1), ("flip", 1), ("roll", 3), ("roll", -2),
                                         ("roll", 11)])
def test_gpt_rows_hold_the_target_of_each_mode_and_ignore_padding(mode, shift):
    task = _task(mode=mode, shift=shift, vocab=7, length=9, min_length=1,
                 curriculum="uniform")
    n = task.n
    batch = _batch(task, 4, 200, seed=3)
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == y.shape == (200, 2 * n) == (200, task.seq_len)
    assert (x[:, n] == task.sep).all() and (y[:, :n] == IGNORE).all()
    lengths = set()
    for inputs, targets in zip(x.tolist(), y.tolist()):
        row = [s for s in inputs[:n] if s != task.pad]
        length = len(row)
        lengths.add(length)
        assert inputs[length:n] == [task.pad] * (n - length)  # padding only past the row
        assert max(row) < task.vocab
        assert targets[n:n + length] == _expected(row, mode, shift)
        assert targets[n + length:] == [IGNORE] * (n - length)
        # teacher forcing: output i-1 is the input before output i, PAD past the row
        assert inputs[n + 1:] == (targets[n:n + length] + [task.pad] * n)[:n - 1]
    assert lengths == set(range(1, n + 1))


def test_thinker_rows_are_the_padded_input_and_its_target():
    task = _task(mode="flip", vocab=5, length=6, curriculum="uniform")
    model = task.build_model(ModelConfig(arch="thinker", n_layer=1, n_head=2, d_model=16))
    batch = _batch(task, 0, 64)
    x, y = batch["inputs"], batch["targets"]
    assert x.shape == y.shape == (64, 6)
    for inputs, targets in zip(x.tolist(), y.tolist()):
        row = [s for s in inputs if s != task.pad]
        assert targets == row[::-1] + [IGNORE] * (6 - len(row))
    out = task.loss(model, batch)
    assert torch.isfinite(out.total) and int(out.count) == int((y != IGNORE).sum())
    metrics = task.evaluate(model, 50, CPU)
    assert set(metrics) == {"accuracy", "token_accuracy", "mean_length"}


def test_batches_are_a_function_of_seed_and_step_and_never_read_the_host():
    task = _task(length=12, curriculum="uniform")
    a = _batch(task, 5, 32, seed=1)
    assert all(torch.equal(a[k], _batch(task, 5, 32, seed=1)[k]) for k in a)
    assert not torch.equal(a["inputs"], _batch(task, 6, 32, seed=1)["inputs"])
    assert not torch.equal(a["inputs"], _batch(task, 5, 32, seed=2)["inputs"])
    for other in (5 + 10_000, 5 + 39 * 256):  # no period
        assert not torch.equal(a["inputs"], _batch(task, other, 32, seed=1)["inputs"])
    # meta tensors hold no values: a batch that read one on the host (.item(), a Python
    # branch on a tensor) would fail here
    meta = torch.device("meta")
    out = task.batch(torch.tensor(5, device=meta), 32, meta, 1)
    assert out["inputs"].shape == (32, 24) and out["inputs"].is_meta


def test_training_never_draws_held_out_rows_and_evaluation_only_draws_them():
    task = _task(vocab=4, length=10, curriculum="uniform")
    x = _batch(task, 0, 4096)["inputs"][:, :10]
    lengths = (x != task.pad).sum(1)
    symbols = torch.where(x == task.pad, 0, x)
    assert not task._held_out(symbols, lengths).any()
    # 4**8 = 65536 rows of length 8: one in 20 held out, each drawn row among them
    held = task.held_out_rows(8, 500, CPU)
    assert task._held_out(held, torch.full((500,), 8)).all()
    assert len({tuple(r[:8].tolist()) for r in held}) > 450
    # 4**5 = 1024 rows are too few for a bucket: all of them train, evaluation draws any
    assert not task._held_out(task.held_out_rows(5, 200, CPU), torch.full((200,), 5)).any()


def _lengths(task, steps=4, batch_size=2048):
    x = torch.cat([_batch(task, s, batch_size)["inputs"][:, :task.n] for s in range(steps)])
    return (x != task.pad).sum(1)


def _close(observed, expected, total):
    """Counts within 5 standard deviations of their binomial expectation."""
    for got, p in zip(observed.tolist(), expected):
        assert abs(got - p * total) <= 5 * (total * p * (1 - p)) ** 0.5 + 1, (got, p * total)


def test_length_distributions_of_the_curricula():
    assert (_lengths(_task(length=10), steps=1) == 10).all()
    uniform = [0.0] * 2 + [1 / 8] * 8
    for curriculum in ("uniform", "dynamic"):  # dynamic starts uniform
        task = _task(length=10, min_length=3, curriculum=curriculum)
        assert task.distribution().tolist() == pytest.approx(uniform, abs=1 / CDF_ONE)
        _close(torch.bincount(_lengths(task), minlength=11)[1:], uniform, 4 * 2048)
    # lengths 3-6 solved, 7 half, 8-10 not: weights 0.1 (the floor), 0.6 and 1.1
    task.update([1.0] * 4 + [0.5, 0.0, 0.0, 0.0])
    weights = [0.0] * 2 + [0.1] * 4 + [0.6] + [1.1] * 3
    expected = [w / sum(weights) for w in weights]
    assert task.distribution().tolist() == pytest.approx(expected, abs=1 / CDF_ONE)
    _close(torch.bincount(_lengths(task), minlength=11)[1:], expected, 4 * 2048)


def test_dynamic_curriculum_moves_in_place_and_is_followed_by_the_batch():
    task = _task(length=6, min_length=2, curriculum="dynamic", curriculum_threshold=0.8)
    assert task.level == 1 and not task.curriculum_done
    cdf = task._on(CPU)[0]
    address = cdf.data_ptr()
    # an unsolved length below solved ones caps the level
    assert task.update([0.79, 1.0, 1.0, 0.0, 0.0]) is None and task.level == 1
    assert task.update([0.8, 0.9, 0.5, 0.0, 0.0]) == "curriculum: lengths 2-3 of 6 solved"
    assert task._on(CPU)[0].data_ptr() == address  # a captured step reads the same tensor
    assert torch.equal(task._on(CPU)[0], task.cdf)
    lengths = _lengths(task, steps=1)
    assert (lengths == 6).float().mean() > 3 * (lengths == 2).float().mean()
    assert "unsolved again" in task.update([0.0] * 5) and task.level == 1
    assert task.update([1.0] * 5) == "curriculum: lengths 2-6 of 6 solved"
    assert task.curriculum_done
    with pytest.raises(ValueError, match="an accuracy for each of the 5 lengths"):
        task.update([1.0] * 4)
    for fixed in ("none", "uniform"):
        other = _task(length=6, curriculum=fixed)
        assert other.curriculum_done and other.level == 6
        other.evaluate(task.build_model(ModelConfig(n_layer=1, d_model=16)), 8, CPU)
        assert other.curriculum({"accuracy": 1.0}) is None


def test_evaluation_measures_every_length_and_the_curriculum_takes_it():
    task = _task(vocab=5, length=5, curriculum="dynamic")
    model = task.build_model(ModelConfig(n_layer=1, n_head=2, d_model=16))
    assert task.curriculum({"accuracy": 1.0}) is None  # nothing measured yet
    # a model that answers every length-2 row right and nothing else
    task.predict = lambda m, x: torch.where((x != task.pad).sum(1, keepdim=True) == 2,
                                            x, task.pad)
    metrics = task.evaluate(model, 100, CPU)
    assert metrics["accuracy"] == 0.0 and metrics["level"] == 0.0
    assert metrics["mean_length"] == pytest.approx(3.0, abs=1e-3)
    assert task._measured == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert task.curriculum(metrics) is None and task._measured is None
    assert task.length_accuracy == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert task.distribution()[1] < task.distribution()[0]
    del task.predict
    assert set(task.evaluate(model, 10, CPU)) == {"accuracy", "token_accuracy", "mean_length",
                                                  "level"}


def test_state_dict_holds_level_accuracies_and_distribution():
    task = _task(length=8, curriculum="dynamic")
    task.update([1.0, 1.0, 1.0, 0.3, 0.0, 0.0, 0.0, 0.0])
    state = task.state_dict()
    assert state["level"] == 3 and len(state["length_cdf"]) == 8
    again = _task(length=8, curriculum="dynamic")
    again._on(CPU)  # device tensors made before the load are updated in place
    again.load_state_dict(state)
    assert again.level == 3 and again.length_accuracy == task.length_accuracy
    assert torch.equal(again.distribution(), task.distribution())
    assert torch.equal(_batch(again, 7, 64)["inputs"], _batch(task, 7, 64)["inputs"])
    with pytest.raises(ValueError, match="task.length=9"):
        _task(length=9, curriculum="dynamic").load_state_dict(state)


def test_copy_learns_through_the_trainer_with_the_dynamic_curriculum(tmp_path):
    # measured on a 2-core CPU: lengths 1-5 solved at step 50, every length and held-out
    # exact match 1.0 from step 100 on; 4-7 s
    cfg = build_config(overrides=TINY + [
        "task.length=6", "task.vocab=8", "task.curriculum=dynamic", "model.n_layer=2",
        "model.d_model=64", "train.batch_size=64", "train.steps=200",
        "optim.warmup_steps=20", "log.every=20", "eval.every=50", "eval.samples=200",
        f"log.out_dir={tmp_path}"])
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    losses = [r["loss"] for r in _records(str(tmp_path / "run"), "train")]
    assert losses[-1] < 0.05 * losses[0]
    assert summary["final"]["accuracy"] >= 0.95 and summary["final"]["level"] == 6
    events = [e["message"] for e in _records(str(tmp_path / "run"), "event")]
    assert any(m.startswith("curriculum: lengths 1-") for m in events)


def test_a_resumed_run_continues_at_its_curriculum_level(tmp_path, monkeypatch):
    real = Copy.evaluate

    def one_more_solved(self, *args, **kwargs):
        metrics = real(self, *args, **kwargs)
        self._measured = [1.0 if n <= self.level + 1 else 0.0 for n in self.lengths]
        return {**metrics, "level": float(self._level_of(self._measured))}

    monkeypatch.setattr(Copy, "evaluate", one_more_solved)
    args = TINY + ["task.length=12", "task.curriculum=dynamic", "model.d_model=16",
                   "train.batch_size=8", "eval.every=2", "eval.samples=12",
                   "checkpoint.every=100", f"log.out_dir={tmp_path}"]
    run_dir = str(tmp_path / "run")
    train(build_config(overrides=args + ["train.steps=8"]), run_dir=run_dir)
    state = checkpoint.load(checkpoint.latest(run_dir))["task"]
    assert state["level"] == 4 and state["length_accuracy"] == [1.0] * 4 + [0.0] * 8
    probs = torch.diff(torch.tensor(state["length_cdf"]), prepend=torch.zeros(1)) / CDF_ONE
    assert probs[4:].sum() > 0.9  # unsolved lengths weigh 1.1, solved ones 0.1
    train(build_config(overrides=args + ["train.steps=16"]), run_dir=run_dir)
    evals = _records(run_dir, "eval")
    assert [e["step"] for e in evals] == list(range(2, 17, 2))
    assert [e["level"] for e in evals] == list(range(1, 9))


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "rotate"}, "task.mode must be one of"),
    ({"vocab": 1}, "task.vocab must be in"),
    ({"length": 0}, "task.length must be in"),
    ({"length": 5000}, "task.length must be in"),
    ({"length": 5, "min_length": 6}, "task.min_length must be in"),
    ({"curriculum": "linear"}, "task.curriculum must be one of"),
    ({"curriculum_threshold": 0}, "task.curriculum_threshold must be"),
    ({"curriculum_floor": 0}, "task.curriculum_floor must be"),
    ({"curriculum_floor": 1.5}, "task.curriculum_floor must be"),
])
def test_bad_copy_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CopyConfig(**kwargs)


def test_copy_options_through_the_config():
    cfg = build_config(overrides=["task.name=copy", "task.mode=roll", "task.shift=-2"])
    task = build_task(cfg.task)
    assert isinstance(task, Copy) and task.cfg.shift == -2
    with pytest.raises(ValueError, match="task.length must be"):
        build_config(overrides=["task.name=copy", "task.length=-1"])
