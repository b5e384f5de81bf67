"""The distill task: teachers from an mlm run, a module or trained at set-up (once, kept in
the checkpoints), every metric logged, the CCA window independent of gradient
accumulation, the losses, batches from (seed, step) alone and option errors."""
import json
import os

import pytest
import torch

from fastlab.tasks.base import ConfigError
from fastlab.tasks.distill import Distill, DistillConfig
from fastlab.train import checkpoint
from fastlab.train.config import ModelConfig, build_config
from fastlab.train.loop import train

CPU = torch.device("cpu")
BASE = ["train.device=cpu", "log.nvml=false", "log.progress=false", "task.corpus_paragraphs=200",
        "task.seq_len=32", "model.n_layer=1", "model.n_head=2", "model.d_model=32"]
#: a student of 16 wide against the teacher's 32
STUDENT = ["task.name=distill", "model.d_model=16", "task.cca_k=4", "task.cca_rows=16"]
TRAIN_METRICS = {"mse", "nmse", "cosine", "mse/mask", "nmse/mask", "cosine/mask", "mask_mean"}
EVAL_METRICS = TRAIN_METRICS | {"cca/held_out", "cca/5x", "cca_top4/5x", "cca_steps/5x",
                                "cca/10x", "cca_top4/10x", "cca_steps/10x"}


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    """A small mlm run directory: the teacher (d_model 32) of most tests."""
    out = tmp_path_factory.mktemp("mlm")
    cfg = build_config(overrides=BASE + [
        "task.name=mlm", "train.batch_size=16", "train.steps=20", "eval.every=20",
        "eval.samples=32", "optim.warmup_steps=2", f"log.out_dir={out}"])
    train(cfg, run_dir=str(out / "run"))
    return str(out / "run")


def _cfg(tmp_path, *extra):
    return build_config(overrides=BASE + STUDENT + [f"log.out_dir={tmp_path}", *extra])


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _task(**kwargs) -> Distill:
    options = dict(corpus_paragraphs=200, seq_len=32, cca_k=4, cca_rows=16)
    return Distill(DistillConfig(**{**options, **kwargs}))


def test_distill_learns_and_logs_every_metric(tmp_path, mlm_run):
    # measured on a 2-core CPU: the MSE falls from 0.79 over the first 10 steps to 0.04
    # over steps 50-60 and the held-out cosine reaches 0.98; ~2 s
    cfg = _cfg(tmp_path, f"task.teacher={mlm_run}", "train.batch_size=16", "train.steps=60",
               "optim.lr=3e-3", "optim.warmup_steps=5", "log.every=10", "eval.every=30",
               "eval.samples=64")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    logged = _records(str(tmp_path / "run"), "train")
    assert all(TRAIN_METRICS <= set(r) for r in logged)
    assert logged[-1]["mse"] == pytest.approx(logged[-1]["loss"])  # task.loss=mse
    assert logged[-1]["loss"] < 0.3 * logged[0]["loss"], [r["loss"] for r in logged]
    assert 0.8 < logged[-1]["mask_mean"] < 0.95  # about 15% of the text tokens masked
    evals = _records(str(tmp_path / "run"), "eval")
    assert all(EVAL_METRICS <= set(r) for r in evals)
    final = summary["final"]
    assert final["cosine"] > 0.9 and final["cosine/mask"] > 0.9
    # the windows hold every step so far: 5 x 32 and 10 x 32 steps are longer than the run
    assert final["cca_steps/5x"] == final["cca_steps/10x"] == 60
    assert 0 < final["cca/5x"] <= final["cca_top4/5x"] <= 1


def test_gradient_accumulation_changes_neither_losses_nor_the_cca_window(tmp_path, mlm_run):
    runs = {}
    for accum in (1, 4):
        cfg = _cfg(tmp_path, f"task.teacher={mlm_run}", "train.batch_size=8", "train.steps=3",
                   f"train.grad_accum={accum}", "log.every=1", "eval.every=3",
                   "eval.samples=16", "optim.warmup_steps=0")
        run_dir = str(tmp_path / f"accum{accum}")
        train(cfg, run_dir=run_dir)
        state = checkpoint.load(checkpoint.latest(run_dir))
        runs[accum] = ([r["cosine"] for r in _records(run_dir, "train")], state["task"])
    (cos1, task1), (cos4, task4) = runs[1], runs[4]
    assert cos1 == pytest.approx(cos4, rel=1e-5)
    w1, w4 = task1["cca_window"], task4["cca_window"]
    assert torch.equal(w1["step"][:3], torch.arange(3)) and (w1["step"][3:] == -1).all()
    assert torch.equal(w1["step"], w4["step"]) and torch.equal(w1["weight"], w4["weight"])
    # 8 rows of 2 tokens each: the 16 rows of a step, whatever the micro-batch held
    assert int(w1["weight"][0].sum()) == 16
    torch.testing.assert_close(w1["y"], w4["y"])
    torch.testing.assert_close(w1["x"], w4["x"], rtol=1e-4, atol=1e-5)


def test_a_teacher_from_an_mlm_run_is_its_encoder(mlm_run):
    task = _task(teacher=mlm_run)
    saved = checkpoint.load(os.path.join(mlm_run, "best.pt"))["model"]
    for name, value in task.teacher.state_dict().items():
        assert torch.equal(value, saved["encoder." + name])
    assert task.teacher_dim == 32 and not task.teacher.training
    assert not any(p.requires_grad for p in task.teacher.parameters())
    # a checkpoint file too, and a student narrower than the teacher
    file = checkpoint.latest(mlm_run)
    model = _task(teacher=file).build_model(ModelConfig(n_layer=1, n_head=2, d_model=16))
    assert model.proj.weight.shape == (32, 16)


def test_a_teacher_of_ones_own_is_any_module(tmp_path, monkeypatch):
    (tmp_path / "my_teacher.py").write_text(
        "import torch\n"
        "class Bag(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(260, 12)\n"
        "    def forward(self, tokens, kv_lens):\n"
        "        return self.emb(tokens)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = _task(teacher="my_teacher:Bag")
    assert task.teacher_dim == 12
    model = task.build_model(ModelConfig(n_layer=1, n_head=2, d_model=16))
    out = task.loss(model, task.batch(torch.tensor(0), 4, CPU, 0))
    assert torch.isfinite(out.total) and set(out.parts) == TRAIN_METRICS
    with pytest.raises(ConfigError, match="task.teacher"):
        _task(teacher="my_teacher:Nothing")


def test_the_set_up_teacher_is_trained_once_and_kept_in_the_checkpoints(tmp_path, monkeypatch):
    trained = []
    real = Distill._train_teacher

    def counted(self, device):
        trained.append(device)
        return real(self, device)

    monkeypatch.setattr(Distill, "_train_teacher", counted)
    setup = ["task.teacher_layers=1", "task.teacher_heads=2", "task.teacher_d_model=16",
             "task.teacher_steps=3", "task.teacher_batch_size=8", "train.batch_size=8",
             "eval.every=100", "eval.samples=16", "log.every=2", "checkpoint.every=2"]
    run_dir = str(tmp_path / "run")
    train(_cfg(tmp_path, *setup, "train.steps=2"), run_dir=run_dir)
    assert len(trained) == 1
    first = checkpoint.load(checkpoint.latest(run_dir))["task"]["teacher"]
    train(_cfg(tmp_path, *setup, "train.steps=4"), run_dir=run_dir)  # resumes at step 2
    assert len(trained) == 1  # read back from the checkpoint, not trained again
    second = checkpoint.load(checkpoint.latest(run_dir))["task"]["teacher"]
    assert all(torch.equal(first["model"][k], v) for k, v in second["model"].items())
    # the teacher does not depend on the run's seed: it has its own
    again = _task(teacher_layers=1, teacher_heads=2, teacher_d_model=16, teacher_steps=3,
                  teacher_batch_size=8)
    torch.manual_seed(123)
    teacher = again.teacher_on(CPU)
    assert all(torch.equal(first["model"][k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("loss", ["cos", "softcca"])
def test_cos_and_softcca_losses(mlm_run, loss):
    task = _task(teacher=mlm_run, loss=loss, softcca_rows=4, softcca_alpha=0.5)
    model = task.build_model(ModelConfig(n_layer=1, n_head=2, d_model=16))
    batch = task.batch(torch.tensor(0), 8, CPU, 0)
    out = task.loss(model, batch)
    out.total.backward()
    assert torch.isfinite(out.total) and model.proj.weight.grad.abs().sum() > 0
    if loss == "cos":
        assert float(out.total.detach() / out.count) == pytest.approx(1 - float(
            out.parts["cosine"][0] / out.parts["cosine"][1]), rel=1e-5)
    else:
        assert int(out.count) == 8 * 4
        assert {"softcca/distance", "softcca/decorrelation"} <= set(out.parts)
        assert float(model.softcca.cov_weight) == 1.0  # SDL's running state advanced
        assert "softcca.cov_x" in model.state_dict()


def test_batches_are_a_function_of_seed_and_step_and_never_read_the_host(mlm_run):
    task = _task(teacher=mlm_run)
    a = task.batch(torch.tensor(4), 16, CPU, 3)
    assert all(torch.equal(a[k], task.batch(torch.tensor(4), 16, CPU, 3)[k]) for k in a)
    assert not torch.equal(a["inputs"], task.batch(torch.tensor(5), 16, CPU, 3)["inputs"])
    assert not torch.equal(a["inputs"], task.batch(torch.tensor(4), 16, CPU, 4)["inputs"])
    real = torch.arange(32) < a["kv_lens"][:, None]
    assert (a["sample"] < a["kv_lens"][:, None]).all()  # drawn rows are real tokens
    assert not (a["masked"] & ~real).any()
    assert torch.equal(a["inputs"][~a["masked"]], a["clean"][~a["masked"]])
    meta = torch.device("meta")
    out = task.batch(torch.tensor(4, device=meta), 16, meta, 3)
    assert out["inputs"].is_meta and out["sample"].shape == a["sample"].shape


@pytest.mark.parametrize("option, value", [
    ("loss", "l1"), ("softcca_alpha", "1.5"), ("softcca_lam", "-1"), ("cca_k", "0"),
    ("cca_rows", "0"), ("teacher_steps", "0"), ("teacher_d_model", "30"),
    ("teacher_lr", "0"), ("mask_prob", "0"),
])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ConfigError, match=f"task.{option}"):
        build_config(overrides=["task.name=distill", f"task.{option}={value}"])


def test_bad_teachers_name_the_option(tmp_path, mlm_run):
    with pytest.raises(ConfigError, match="task.teacher: no such"):
        _task(teacher=str(tmp_path / "nothing"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="task.teacher"):
        _task(teacher=str(junk))
    with pytest.raises(ConfigError, match="task.cca_k"):
        _task(teacher=mlm_run, cca_k=33)  # the teacher has 32 dimensions


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["mse", "softcca"])
def test_the_cca_window_fills_the_same_in_cuda_graphs_as_eagerly(tmp_path, mlm_run, loss):
    windows = {}
    for graphs in ("off", "on"):
        cfg = build_config(overrides=BASE + STUDENT + [
            "train.device=cuda", "train.precision=fp32", "train.compile=off",
            f"train.cuda_graphs={graphs}", f"task.teacher={mlm_run}", f"task.loss={loss}",
            "model.dropout=0", "train.batch_size=16", "train.steps=12", "log.every=4",
            "eval.every=12", "eval.samples=32", f"log.out_dir={tmp_path}"])
        run_dir = str(tmp_path / f"{loss}-{graphs}")
        summary = train(cfg, run_dir=run_dir)
        assert summary["cuda_graphs"] == (graphs == "on")
        windows[graphs] = checkpoint.load(checkpoint.latest(run_dir))["task"]["cca_window"]
    eager, graphed = windows["off"], windows["on"]
    assert torch.equal(eager["step"], graphed["step"]) and (eager["step"][:12] >= 0).all()
    assert torch.equal(eager["weight"], graphed["weight"])
    torch.testing.assert_close(eager["x"], graphed["x"], rtol=1e-3, atol=1e-4)
