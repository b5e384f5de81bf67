"""Never lose a run: damaged checkpoints, reused run directories, changed configs, killed
runs, strict metrics, option errors, and using a finished run (eval, sample, init_from)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastlab.tasks.base import ConfigError
from fastlab.train import checkpoint
from fastlab.train.config import build_config, help_text
from fastlab.train.loop import train

TINY = ["task.n_digits=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
        "train.batch_size=16", "eval.samples=64", "log.progress=false", "train.device=cpu",
        "log.nvml=false"]


def _cfg(tmp_path, *extra):
    return build_config(overrides=TINY + [f"log.out_dir={tmp_path}", "log.name=run", *extra])


def _strict_lines(run_dir):
    """Every metrics.jsonl record, parsed as strict JSON (a bare NaN raises)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def _events(run_dir):
    return [r["message"] for r in _strict_lines(run_dir) if r["kind"] == "event"]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastlab.train", *args], capture_output=True,
                          text=True, timeout=timeout)


def _trained(tmp_path, steps=20, *extra):
    """A run of ``steps`` with checkpoints at 10 and 20."""
    cfg = _cfg(tmp_path, f"train.steps={steps}", "checkpoint.every=10", "checkpoint.keep=3",
               "log.every=5", "eval.every=10", *extra)
    return cfg, train(cfg)


# --- damaged checkpoints -----------------------------------------------------------------
def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _flip_inside_a_tensor(path):
    """Overwrite 1 KB in the middle of the file: inside the weights' bytes."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(1024))


@pytest.mark.parametrize("damage", [_truncate, _flip_inside_a_tensor])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    cfg, _ = _trained(tmp_path)
    run_dir = str(tmp_path / "run")
    newest = checkpoint.latest(run_dir)
    damage(newest)
    with pytest.raises(checkpoint.CheckpointError, match=os.path.basename(newest)):
        checkpoint.load(newest)
    summary = train(build_config(overrides=TINY + [f"log.out_dir={tmp_path}", "log.name=run",
                                                   "train.steps=30", "checkpoint.every=10",
                                                   "checkpoint.keep=3", "eval.every=10"]))
    assert summary["steps"] == 30
    events = _events(run_dir)
    assert any(os.path.basename(newest) in e and e.startswith("skipped checkpoint")
               for e in events), events
    assert "resumed from ckpt-00000010.pt" in events
    # the damaged file is replaced by a good one written by the resumed run
    for _, path in checkpoint.checkpoints(run_dir):
        checkpoint.verify(path)
    rows = [r["step"] for r in _strict_lines(run_dir) if r["kind"] == "train"]
    assert rows == sorted(rows) and len(rows) == len(set(rows))  # steps 15, 20 were redone once


def test_every_checkpoint_bad_is_an_error_line_and_nothing_changes(tmp_path):
    _trained(tmp_path)
    run_dir = tmp_path / "run"
    for _, path in checkpoint.checkpoints(str(run_dir)):
        _flip_inside_a_tensor(path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    out = _cli(*TINY, f"log.out_dir={tmp_path}", "log.name=run", "train.steps=30")
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint of") and "ckpt-00000020.pt" in last \
        and "ckpt-00000010.pt" in last and "log.overwrite=true" in last, out.stderr
    assert "Traceback" not in out.stderr
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=10", "checkpoint.every=5", "eval.every=100")
    train(cfg)
    run_dir = str(tmp_path / "run")
    good = checkpoint.latest(run_dir)
    state = checkpoint.load(good)
    next(iter(state["model"].values())).fill_(float("nan"))
    checkpoint.atomic_save(state, good)  # a well-formed file of bad weights
    summary = train(_cfg(tmp_path, "train.steps=15", "checkpoint.every=5", "eval.every=100"))
    events = _events(run_dir)
    assert any("skipped checkpoint" in e and "NaN or infinity" in e for e in events), events
    assert "resumed from ckpt-00000005.pt" in events
    assert summary["steps"] == 15


# --- one run per directory --------------------------------------------------------------
def test_a_fresh_start_in_a_used_directory_is_refused_and_overwrite_moves_it_aside(tmp_path):
    _trained(tmp_path, 10)
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(ConfigError, match="already holds a run.*log.overwrite=true"):
        train(_cfg(tmp_path, "train.steps=10", "checkpoint.resume=false"))
    assert sorted(p.name for p in run_dir.iterdir()) == before
    out = _cli(*TINY, f"log.out_dir={tmp_path}", "log.name=run", "checkpoint.resume=false")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in \
        out.stderr, out.stderr

    train(_cfg(tmp_path, "train.steps=5", "checkpoint.every=5", "eval.every=5",
               "checkpoint.resume=false", "log.overwrite=true"))
    aside = tmp_path / "run.old-1"
    assert sorted(p.name for p in aside.iterdir()) == before  # the old run, whole
    assert checkpoint.checkpoints(str(aside))[-1][0] == 10
    assert [s for s, _ in checkpoint.checkpoints(str(run_dir))] == [5]  # not rotated away
    assert max(r["step"] for r in _strict_lines(str(run_dir))) == 5
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 5


def test_default_run_names_never_collide(tmp_path):
    from fastlab.train.loop import run_dir_for

    cfg = build_config(overrides=[f"log.out_dir={tmp_path}"])
    first = run_dir_for(cfg)
    os.makedirs(first)
    assert run_dir_for(cfg) != first


def test_resume_with_another_model_shape_is_refused_before_anything_is_written(tmp_path):
    _trained(tmp_path, 10)
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    out = _cli(*TINY, f"log.out_dir={tmp_path}", "log.name=run", "model.d_model=48",
               "train.steps=20")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "another shape" in last and "model.d_model 32 -> 48" in last, last
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_other_config_changes_on_resume_are_logged_and_kept_in_the_history(tmp_path):
    _trained(tmp_path, 10)
    run_dir = str(tmp_path / "run")
    train(_cfg(tmp_path, "train.steps=15", "checkpoint.every=10", "log.every=5",
               "eval.every=10", "optim.lr=1e-3", "train.seed=3"))
    changed = [e for e in _events(run_dir) if e.startswith("config changed on resume")]
    assert len(changed) == 1
    for text in ("optim.lr 0.002 -> 0.001", "train.seed 0 -> 3", "train.steps 10 -> 15"):
        assert text in changed[0], changed
    with open(os.path.join(run_dir, "config_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [h["step"] for h in history] == [0, 10]
    assert history[1]["config"]["optim"]["lr"] == 1e-3 and history[0]["config"]["optim"]["lr"] \
        == 2e-3


def test_a_finished_run_is_left_as_it_is(tmp_path):
    _trained(tmp_path, 10)
    run_dir = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    summary = train(_cfg(tmp_path, "train.steps=10"))
    assert summary["steps"] == 10 and summary["last_train"]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


# --- killed runs, metrics and time --------------------------------------------------------
def _start_and_kill(tmp_path, rows=3):
    """A CLI run killed with SIGKILL once it has logged ``rows`` training records, before
    its first checkpoint; returns the time of the kill."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastlab.train", *TINY,
                             f"log.out_dir={tmp_path}", "log.name=run", "train.steps=100000",
                             "checkpoint.every=100000", "eval.every=100000", "log.every=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= rows:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not checkpoint.checkpoints(str(run_dir))
    return time.time()


def test_a_run_killed_before_its_first_checkpoint_restarts_clean_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    killed_at = _start_and_kill(tmp_path)
    run_dir = str(tmp_path / "run")
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"kind": "train", "step": 9')  # a torn last line

    from fastlab.report import main as report

    assert report([run_dir]) == 0
    text = open(os.path.join(run_dir, "report.md")).read()
    assert "**status**: killed" in text and "no summary.json" in text
    assert "unreadable metrics lines skipped**: 1" in text and "| loss |" in text

    train(_cfg(tmp_path, "train.steps=8", "log.every=2", "eval.every=100"))
    records = _strict_lines(run_dir)
    assert all(r["unix"] >= killed_at for r in records)  # nothing of the dead run is left
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert "restarted from step 0: the run here had no checkpoint" in _events(run_dir)


def test_metrics_are_strict_json_and_time_continues_across_a_resume(tmp_path, monkeypatch):
    from fastlab.tasks.addition import Addition

    real = Addition.loss
    calls = {"n": 0}

    def nan_once(self, model, batch):  # one non-finite loss: logged as null
        out = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 3:
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(Addition, "loss", nan_once)
    cfg = _cfg(tmp_path, "train.steps=10", "checkpoint.every=10", "log.every=1",
               "eval.every=10", "guard.enabled=false")
    train(cfg)
    run_dir = str(tmp_path / "run")
    records = _strict_lines(run_dir)  # raises on a bare NaN
    assert any(r.get("loss", 0.0) is None for r in records if r["kind"] == "train")
    first_end = max(r["time"] for r in records)
    time.sleep(0.2)
    train(_cfg(tmp_path, "train.steps=14", "checkpoint.every=10", "log.every=1",
               "eval.every=10", "guard.enabled=false"))
    later = [r for r in _strict_lines(run_dir) if r["step"] > 10]
    assert later and min(r["time"] for r in later) >= first_end
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["wall_s"] >= first_end


# --- option errors ------------------------------------------------------------------------
@pytest.mark.parametrize("arg, message", [
    ("log.every=0", "log.every must be >= 1"),
    ("guard.max_spikes=0", "guard.max_spikes must be >= 1"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.max_grad_norm=inf", "optim.max_grad_norm must be a finite number"),
    ("guard.snapshot_every=0", "guard.snapshot_every must be >= 1"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
    ("train.threads=-1", "train.threads must be >= 0"),
    ("train.seed=-1", "train.seed must be in"),
    ("train.init_from=/no/such/run", "train.init_from: no such file"),
    ("eval.target=inf", "eval.target must be a finite number"),
    ("model.arch=rnn", "model.arch must be one of"),
    ("log.name=a/b", "log.name must be a plain folder name"),
])
def test_each_invalid_option_is_an_error_line(arg, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[arg])


def test_invalid_options_and_set_up_errors_on_the_command_line(tmp_path):
    out = _cli("log.every=0")
    assert out.returncode == 2 and out.stderr == "error: log.every must be >= 1, got 0\n"
    if not torch.cuda.is_available():
        out = _cli(*TINY, "train.device=cuda", f"log.out_dir={tmp_path}")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith(
            "error: train.device=cuda but this machine has no usable CUDA device")


def test_help_describes_every_option_with_its_allowed_values():
    text = help_text([])
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    assert len(rows) > 40
    for row in rows:
        assert len(row.split(None, 3)) == 4, f"no description: {row}"
    assert "fp32, bf16 or fp16 (CUDA only)" in text and "linear, cosine, inverse_sqrt or constant" in text


def test_threads_default_to_one_per_cuda_run_and_a_share_of_the_cores():
    from fastlab.train import environment

    assert environment.default_threads(torch.device("cuda")) == 1
    cores = environment.available_cores()
    assert environment.default_threads(torch.device("cpu")) == max(1, min(4, cores))
    assert environment.default_threads(torch.device("cpu"), processes=2) == max(
        1, min(4, cores // 2))
    assert environment.default_threads(torch.device("cpu"), processes=64) == 1


# --- using a finished run -----------------------------------------------------------------
def test_eval_sample_and_init_from_use_a_trained_run(tmp_path):
    cfg, summary = _trained(tmp_path, 20)
    run_dir = str(tmp_path / "run")
    from fastlab.eval import main as evaluate

    assert evaluate([run_dir, "--samples", "64", "--device", "cpu"]) == 0
    result = json.load(open(os.path.join(run_dir, "eval-best.json")))
    assert {"exact_match", "digit_accuracy", "val_loss"} <= set(result)
    assert result["checkpoint"] == "best.pt" and result["val_loss"] > 0
    assert evaluate([run_dir, "--checkpoint", "last", "--samples", "64", "--device", "cpu"]) == 0
    last = json.load(open(os.path.join(run_dir, "eval-ckpt-00000020.json")))
    assert last["step"] == 20
    assert last["exact_match"] == pytest.approx(summary["final"]["exact_match"])

    out = subprocess.run([sys.executable, "-m", "fastlab.sample", run_dir, "-n", "3",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all("+" in l and "=" in l and "expected" in l for l in lines)
    out = subprocess.run([sys.executable, "-m", "fastlab.sample", run_dir, "--prompt", "12+34=",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("12+34= -> "), out.stderr
    out = subprocess.run([sys.executable, "-m", "fastlab.sample", run_dir, "--prompt", "1x",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: "), out.stderr

    trained = checkpoint.load(os.path.join(run_dir, "ckpt-00000020.pt"))["model"]
    new = build_config(overrides=TINY + [f"log.out_dir={tmp_path}", "log.name=warm",
                                         "train.steps=1", "optim.lr=1e-12", "optim.warmup_steps=0",
                                         "guard.enabled=false", "optim.weight_decay=0",
                                         f"train.init_from={run_dir}/ckpt-00000020.pt"])
    train(new)
    warm = checkpoint.load(checkpoint.latest(str(tmp_path / "warm")))["model"]
    for key, value in trained.items():
        torch.testing.assert_close(warm[key], value, rtol=0, atol=1e-9)
    assert any("weights initialised from" in e for e in _events(str(tmp_path / "warm")))
    bad = build_config(overrides=TINY + [f"log.out_dir={tmp_path}", "log.name=bad",
                                         "model.d_model=48", f"train.init_from={run_dir}"])
    with pytest.raises(ConfigError, match="differs in shape"):
        train(bad)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_generate_needs_one_position_less_than_prompt_plus_new_tokens():
    from fastlab.models import GPT, GPTConfig, generate

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=13, block_size=11, n_layer=1, n_head=2, d_model=16)).eval()
    prompt = torch.randint(0, 13, (2, 8))
    out = generate(model, prompt, 4)  # 8 + 4 - 1 = 11 positions
    assert torch.equal(out, model.greedy_complete(prompt, 4))
    with pytest.raises(ValueError, match="exceeds block_size 11"):
        generate(model, prompt, 5)


def test_the_guard_forgets_its_window_after_a_rollback_or_a_harder_level():
    """A harder curriculum level (or the state a rollback returns to) starts at a higher
    loss: measured against the old window every step would be a spike, for good."""
    from fastlab.train.config import GuardConfig
    from fastlab.train.guard import SpikeGuard

    guard = SpikeGuard(GuardConfig(window=8), torch.device("cpu"))
    for _ in range(8):
        assert not guard.check(torch.tensor(0.1))
    assert guard.check(torch.tensor(2.4))  # against the old level: a spike
    guard.forget()
    assert not any(bool(guard.check(torch.tensor(2.4 - 0.01 * i))) for i in range(8))
    guard.take_snapshot(0, [torch.zeros(3)])
    guard.roll_back([torch.ones(3)])
    assert int(guard.seen) == 0 and torch.isnan(guard.history).all()
