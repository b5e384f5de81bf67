"""The latent thinker: its memory in a KVCache computes (and differentiates) exactly what the
torch.cat reference does, eagerly, compiled and through the Triton kernels; its options are
checked; it learns addition through the trainer."""
import json
import os

import pytest
import torch

from fastlab.models import Thinker, ThinkerConfig
from fastlab.models.thinker import PLANS, parse_plan
from fastlab.nn.kvcache import KVCache
from fastlab.ops._dispatch import backend
from fastlab.train.config import ModelConfig, build_config
from fastlab.train.loop import train

PLAN_CASES = ["read_write", "read_lookup_write", "mem_lookup+read_input+mem_write+mem_lookup",
              "read_input+mem_write+read_input+mem_write"]


def _thinker(dtype=torch.float64, **kwargs) -> Thinker:
    options = dict(vocab_size=13, input_len=7, output_len=3, d_model=16, n_head=4, d_hid=24,
                   n_latent=3, n_step=3)
    options.update(kwargs)
    return Thinker(ThinkerConfig(**options)).to(dtype)


def _inputs(model: Thinker, batch: int = 5) -> torch.Tensor:
    cfg = model.cfg
    return torch.randint(0, cfg.vocab_size, (batch, cfg.input_len))


def _grads(model: Thinker, inputs: torch.Tensor, forward=None):
    """Logits and the gradient of every parameter of a fixed random function of them."""
    logits = (model if forward is None else forward)(inputs)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1),
                          dtype=logits.dtype)
    grads = torch.autograd.grad((logits * weights).sum(), list(model.parameters()))
    return logits.detach(), grads


def _check_against_reference(model, inputs, got_logits, got_grads, rtol, atol):
    want_logits, want_grads = _grads(model, inputs, lambda x: model(x, use_cache=False))
    torch.testing.assert_close(got_logits, want_logits, rtol=rtol, atol=atol)
    for (name, _), got, want in zip(model.named_parameters(), got_grads, want_grads):
        assert want.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("n_layer", [1, 2])
@pytest.mark.parametrize("plan", PLAN_CASES)
def test_gradients_through_the_cache_equal_the_concatenation_reference(plan, n_layer):
    model = _thinker(plan=plan, n_layer=n_layer).train()
    inputs = _inputs(model)
    logits, grads = _grads(model, inputs)
    assert logits.shape == (5, 3, 13)
    _check_against_reference(model, inputs, logits, grads, rtol=1e-10, atol=1e-12)


def test_the_memory_lives_in_one_kvcache_appended_at_every_write(monkeypatch):
    appends = []
    original = KVCache.append

    def counting(cache, k, v, new_lens=None):
        appends.append((cache, k.shape, k.requires_grad))
        original(cache, k, v, new_lens)

    monkeypatch.setattr(KVCache, "append", counting)
    model = _thinker(plan="read_input+mem_write+read_input+mem_write", n_step=2)
    model(_inputs(model, batch=4))
    assert model.plan == ("read_input", "mem_write") * 4 + ("output",)
    assert len(appends) == 4 and len({id(c) for c, _, _ in appends}) == 1
    cache = appends[0][0]
    assert cache.max_len == model.cfg.memory_len == 4 * 3 and cache.length_bound == 12
    assert all(shape == (4, 4, 3, 4) and grad for _, shape, grad in appends)
    assert len(cache.chunks) == 4  # kept for autograd: every step's write gets its gradient
    appends.clear()
    model(_inputs(model), use_cache=False)
    assert not appends


def test_compiled_training_through_the_cache_equals_the_reference():
    # the trainer compiles the loss on CUDA; a traced cache read used to fail backward with
    # autograd's in-place error
    model = _thinker(dtype=torch.float32, plan="read_lookup_write", n_step=2)
    inputs = _inputs(model)
    compiled = torch.compile(model, backend="aot_eager")  # the failure is AOT autograd's
    for _ in range(2):  # the second call reuses the compiled graphs
        logits, grads = _grads(model, inputs, compiled)
    _check_against_reference(model, inputs, logits, grads, rtol=1e-4, atol=1e-6)


def test_the_triton_kernels_train_and_infer_as_the_reference():
    # the GPU path on CPU (Triton interpreter): attention over the cache's buffer for
    # training, the fused cache-attention kernel for inference; head_dim 2 as in the log
    model = _thinker(dtype=torch.float32, plan="read_lookup_write", n_step=2, n_latent=2,
                     d_model=8, n_head=4)
    inputs = _inputs(model, batch=2)
    with backend("kernel"):
        logits, grads = _grads(model, inputs)
        with torch.no_grad():
            inferred = model(inputs)
    _check_against_reference(model, inputs, logits, grads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inferred, logits, rtol=1e-5, atol=1e-6)


def test_from_model_config_and_plans():
    cfg = ThinkerConfig.from_model_config(ModelConfig(arch="thinker", d_model=32, n_head=4),
                                          vocab_size=18, input_len=8, output_len=4)
    assert (cfg.d_hid, cfg.n_latent, cfg.n_step, cfg.plan) == (128, 8, 2, "read_write")
    cfg = ThinkerConfig.from_model_config(
        ModelConfig(arch="thinker", d_model=16, n_head=8, d_hid=64, n_latent=4, n_step=3,
                    plan="read_lookup_write"), vocab_size=18, input_len=8, output_len=4)
    assert (cfg.d_hid, cfg.n_latent, cfg.n_step, cfg.memory_len) == (64, 4, 3, 12)
    assert parse_plan("read_write") == PLANS["read_write"] == ("read_input", "mem_write")
    assert parse_plan(" mem_lookup + mem_write") == ("mem_lookup", "mem_write")
    model = Thinker(cfg)
    assert model.flops_per_token(12) > 6 * model.num_params() * 4 / 12


@pytest.mark.parametrize("kwargs, message", [
    ({"n_latent": 0}, "n_latent must be a positive int"),
    ({"n_step": 1.5}, "n_step must be a positive int"),
    ({"input_len": 0}, "input_len must be"),
    ({"d_model": 12, "n_head": 8}, r"d_model \(12\) must be divisible by n_head \(8\)"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"plan": "read_think"}, "plan must be a preset .*unknown op 'read_think'"),
    ({"plan": "read_input+mem_lookup"}, "never runs mem_write"),
    ({"plan": "read_input+mem_write+output"}, "output runs once after the last step"),
])
def test_bad_thinker_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _thinker(**kwargs)


def test_bad_inputs_and_model_plan_are_value_errors():
    model = _thinker()
    with pytest.raises(ValueError, match=r"inputs must be a \(batch, input_len=7\) tensor"):
        model(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs must be a"):
        model(torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs must be integer tokens"):
        model(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="model.plan must be a preset"):
        build_config(overrides=["model.arch=thinker", "model.plan=bogus"])


def _train_records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_the_thinker_learns_two_digit_addition_through_the_trainer(tmp_path):
    # measured on a 2-core CPU: exact match 0.61 at step 1000 on 1 thread, 1.0 on 2 (the
    # thread count changes the rounding and the step of the breakthrough); the threshold
    # leaves room for other CPUs'. At 600 steps 2 threads reached only 0.10
    args = ["model.arch=thinker", "task.n_digits=2", "model.d_model=32", "model.n_head=4",
            "model.n_layer=1", "model.n_latent=4", "model.n_step=2", "train.batch_size=128",
            "optim.lr=0.01", "optim.warmup_steps=20", "train.steps=1000", "eval.every=1000",
            "eval.samples=500", "log.every=50", "train.device=cpu", "log.nvml=false",
            "log.progress=false", f"log.out_dir={tmp_path}"]
    summary = train(build_config(overrides=args), run_dir=str(tmp_path / "run"))
    losses = [r["loss"] for r in _train_records(str(tmp_path / "run"), "train")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["final"]["exact_match"] >= 0.4, summary["final"]
