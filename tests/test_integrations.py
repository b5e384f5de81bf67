"""fastlab.integrations: patched transformers models against the same models unpatched.

Tiny Llama (GQA), GPT-2 and BERT masked-LM models are built from configs (nothing is
downloaded), in float32 on the CPU, where fastlab runs its references. A patched model must
give the unpatched model's loss (rtol 1e-5, atol 1e-6: float32 rounding; the fused loss is
formed in float64 there) and parameter gradients (rtol 1e-4, atol 1e-5 times the largest
gradient of the model: some gradients, such as BERT's key biases, are 0 in exact math and
1e-12 of rounding noise in both models), with right padding and -100 labels; under bf16 autocast within bf16's rounding (see that
test). Unpatching
must restore every module's type and forward, the model's attributes and its outputs bit
for bit.
"""
import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: fastlab.integrations needs it")

from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)

import fastlab.integrations as fi  # noqa: E402
from fastlab.ops._dispatch import backend  # noqa: E402

VOCAB = 97
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-4, 1e-5


def _build(family: str, **overrides):
    torch.manual_seed(1)
    if family == "llama":
        options = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
        build = lambda o: LlamaForCausalLM(LlamaConfig(**o))  # noqa: E731
    elif family == "gpt2":
        options = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1,
                       eos_token_id=2)
        build = lambda o: GPT2LMHeadModel(GPT2Config(**o))  # noqa: E731
    else:
        options = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=80,
                       max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                       hidden_dropout_prob=0.0)
        build = lambda o: BertForMaskedLM(BertConfig(**o))  # noqa: E731
    return build({**options, **overrides}).train()


def _batch(family: str, padding: str, batch=3, seq=13, seed=0):
    """input_ids, attention_mask and labels (-100 on padding, and on unmasked BERT tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "right":
        mask[1, seq - 4:] = 0
        mask[-1, 5:] = 0
    elif padding == "left":
        mask[1, :4] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    if family == "bert":
        labels[torch.rand(batch, seq, generator=g) < 0.5] = -100
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out, grads


def _assert_same_grads(got, want):
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=GRAD_RTOL,
                                   atol=GRAD_ATOL_SCALE * scale, msg=lambda m: f"{name}: {m}")


def _check_once(family, padding, **call_kwargs):
    model = _build(family)
    ids, mask, labels = _batch(family, padding)
    want, want_grads = _loss_and_grads(model, ids, mask, labels, **call_kwargs)
    fi.patch(model)
    got, got_grads = _loss_and_grads(model, ids, mask, labels, **call_kwargs)
    assert got.logits is None  # training mode with labels: never materialised
    torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
    _assert_same_grads(got_grads, want_grads)
    return model


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_patched_loss_and_gradients_match(family, padding):
    _check_once(family, padding)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bf16_autocast_matches(family):
    """Under autocast both models round to bf16 in different places (the attention's inputs
    and output, the logits' chunks): loss within rtol 1e-3 (measured 1.5e-5), gradients
    within 3e-2 of the largest (measured 1e-2)."""
    model = _build(family)
    ids, mask, labels = _batch(family, "right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _loss_and_grads(model, ids, mask, labels)
        fi.patch(model)
        got, got_grads = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-3, atol=1e-4)
    scale = max(g.abs().max().item() for g in want_grads.values())
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=3e-2,
                                   atol=3e-2 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_kwargs_of_the_trainer_match(family):
    """num_items_in_batch (gradient accumulation's token count) and shift_labels."""
    ids, mask, labels = _batch(family, "right")
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    _check_once(family, "right", num_items_in_batch=torch.tensor(17))
    _check_once(family, "right", shift_labels=shift)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_logits_are_kept_where_asked(family):
    ids, mask, labels = _batch(family, "right")
    model = _build(family).eval()

    def call():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, labels=labels)

    want = call()
    valid = mask.bool()  # a causal padding query sees other keys than SDPA shows it
    for skip_logits, training, kept in ((None, False, True), (True, False, False),
                                        (False, True, True), (None, True, False)):
        fi.patch(model, skip_logits=skip_logits)
        model.train(training)
        got = call()
        assert (got.logits is not None) == kept, (skip_logits, training)
        if kept:
            torch.testing.assert_close(got.logits[valid], want.logits[valid], rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
        fi.unpatch(model)
        model.eval()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_return_dict_false_gives_the_tuple(family, training):
    ids, mask, labels = _batch(family, "right")
    model = _build(family).train(training)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    fi.patch(model)
    got = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], want[0], **LOSS_TOL)  # the loss first, as unpatched
    if not training:  # then the logits
        valid = mask.bool()
        torch.testing.assert_close(got[1][valid], want[1][valid], rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return [(name, type(m), type(m).forward, "forward" in m.__dict__)
            for name, m in model.named_modules()]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_patch_reports_and_unpatch_restores(family):
    model = _build(family)
    ids, mask, labels = _batch(family, "right")
    before = _snapshot(model)
    attributes = set(model.__dict__)
    impl = model.config._attn_implementation
    want, want_grads = _loss_and_grads(model, ids, mask, labels)
    changes = fi.patch(model)
    targets = [c.target for c in changes]
    assert "forward" in targets and "config._attn_implementation" in targets
    assert ("loss_function" in targets) == (family != "bert")
    layer_targets = {"LlamaRMSNorm.forward (5 modules)", "LlamaMLP.forward (2 modules)",
                     "LlamaAttention.forward (2 modules)"}
    assert layer_targets <= set(targets) if family == "llama" else not any(
        t.endswith("modules)") for t in targets)
    assert all(str(c).count("->") == 1 for c in changes)
    assert model.config._attn_implementation == "fastlab" and fi.is_patched(model)
    with pytest.raises(RuntimeError, match="already patched"):
        fi.patch(model)
    assert fi.unpatch(model) == changes
    assert not fi.is_patched(model)
    assert _snapshot(model) == before
    assert set(model.__dict__) == attributes
    assert model.forward.__func__ is type(model).forward
    assert model.config._attn_implementation == impl
    got, got_grads = _loss_and_grads(model, ids, mask, labels)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    assert all(torch.equal(got_grads[n], want_grads[n]) for n in want_grads)
    with pytest.raises(RuntimeError, match="not patched"):
        fi.unpatch(model)


def test_loss_only_or_attention_only():
    ids, mask, labels = _batch("gpt2", "right")
    model = _build("gpt2")
    want, want_grads = _loss_and_grads(model, ids, mask, labels)
    for options in (dict(attention=False), dict(loss=False)):
        changes = fi.patch(model, **options)
        assert (model.config._attn_implementation == "fastlab") == options.get("attention", True)
        assert ("forward" in [c.target for c in changes]) == options.get("loss", True)
        got, got_grads = _loss_and_grads(model, ids, mask, labels)
        torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
        _assert_same_grads(got_grads, want_grads)
        fi.unpatch(model)


class _Counting:
    """Wraps a fastlab op as the integration module sees it, counting the calls."""

    def __init__(self, monkeypatch, name):
        import fastlab.integrations.hf as hf

        self.calls, op = 0, getattr(hf, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return op(*args, **kwargs)

        monkeypatch.setattr(hf, name, counted)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_llama_layer_parts_run_fastlab_ops_on_this_instance_only(monkeypatch, padding):
    """RMSNorm, SwiGLU and RoPE go through fastlab on the patched model, each part alone
    and all together (same loss and gradients as unpatched, tolerances of the module
    docstring; -100 labels on the padding), while a second, unpatched model of the same
    classes keeps transformers' own code."""
    counters = {part: _Counting(monkeypatch, name) for part, name in
                (("rms_norm", "_rms_norm"), ("mlp", "swiglu"), ("rope", "apply_rotary"))}
    per_forward = {"rms_norm": 5, "mlp": 2, "rope": 2}  # 2 layers: 2 norms each + final
    ids, mask, labels = _batch("llama", padding)
    other = _build("llama")
    for enabled in (("rms_norm",), ("mlp",), ("rope",), ("rms_norm", "mlp", "rope")):
        model = _build("llama")
        want, want_grads = _loss_and_grads(model, ids, mask, labels)
        changes = fi.patch(model, **{part: part in enabled for part in counters})
        assert sum("fastlab" in c.after and c.target.endswith("modules)")
                   for c in changes) == len(enabled)
        for counter in counters.values():
            counter.calls = 0
        got, got_grads = _loss_and_grads(model, ids, mask, labels)
        torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
        _assert_same_grads(got_grads, want_grads)
        assert {p: c.calls for p, c in counters.items()} == {
            p: per_forward[p] if p in enabled else 0 for p in counters}
        _loss_and_grads(other, ids, mask, labels)  # transformers' code: no fastlab call
        assert {p: c.calls for p, c in counters.items()} == {
            p: per_forward[p] if p in enabled else 0 for p in counters}
        fi.unpatch(model)


def test_llama_mlp_without_silu_is_kept_and_reported():
    model = _build("llama", hidden_act="gelu")
    ids, mask, labels = _batch("llama", "right")
    want, want_grads = _loss_and_grads(model, ids, mask, labels)
    changes = fi.patch(model)
    mlp = [c for c in changes if c.target.startswith("LlamaMLP")]
    assert len(mlp) == 1 and "skipped: act_fn is GELUActivation" in mlp[0].after
    assert all("forward" not in m.__dict__ for m in model.modules()
               if type(m).__name__ == "LlamaMLP")
    got, got_grads = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
    _assert_same_grads(got_grads, want_grads)


def test_llama_modules_with_an_instance_forward_are_left_alone():
    model = _build("llama")
    norm = model.model.norm
    norm.forward = lambda hidden_states: hidden_states  # someone else's patch
    changes = fi.patch(model)
    kept = [c for c in changes if c.target == "LlamaRMSNorm.forward (1 modules)"]
    assert len(kept) == 1 and kept[0].after.startswith("kept (skipped")
    fi.unpatch(model)
    assert "forward" in norm.__dict__ and norm(torch.ones(2)).equal(torch.ones(2))


def test_generation_with_a_kv_cache_matches():
    """Decoding: one query over the cached keys, aligned bottom-right by the op."""
    model = _build("llama").eval()
    prompt = _batch("llama", "none", batch=2, seq=5)[0]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **kwargs)
    fi.patch(model)
    torch.testing.assert_close(model.generate(prompt, **kwargs), want, rtol=0, atol=0)


def test_refusals_are_clear():
    model = _build("llama")
    ids, mask, labels = _batch("llama", "left")
    fi.patch(model)
    with pytest.raises(ValueError, match="left padding"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    four_d = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="4-D attention mask"):
        model(input_ids=ids, attention_mask=four_d, labels=labels)
    ids, mask, _ = _batch("llama", "right")
    with pytest.raises(ValueError, match="gaps"):  # generation appends ones after the zeros
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
    fi.unpatch(model)
    with pytest.raises(TypeError, match="supports"):
        fi.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="patch_bert expects"):
        fi.patch_bert(model)


@pytest.mark.parametrize("family, field", [("gpt2", "attn_pdrop"),
                                           ("bert", "attention_probs_dropout_prob"),
                                           ("llama", "attention_dropout")])
def test_attention_dropout_goes_to_the_op(family, field):
    """Dropout in training only; the op's draws are not torch's, so a training step matches
    the unpatched model's in distribution, not element for element: checked here are
    evaluation (no dropout, the unpatched loss), reproducibility from torch's seed, and that
    training drops something."""
    model = _build(family, **{field: 0.3})
    ids, mask, labels = _batch(family, "right")
    with torch.no_grad():
        want = model.eval()(input_ids=ids, attention_mask=mask, labels=labels).loss
    fi.patch(model)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, **LOSS_TOL)
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(_loss_and_grads(model, ids, mask, labels)[0].loss)
    assert torch.equal(losses[0], losses[1]) and not torch.allclose(losses[0], got)


def test_sliding_window_config_is_refused():
    model = _build("llama")
    model.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding window"):
        fi.patch_llama(model)


def test_builder_lengths_skip_the_ops_check_only_when_the_keys_cover_them(monkeypatch):
    """Lengths from the mask builder are in range by construction: the attention function
    skips the op's value check (a host sync per layer) where the keys are at least as long
    as the builder's bound, and keeps it otherwise."""
    import fastlab.integrations.hf as hf

    seen = []
    real = hf.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["validate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "attention", spy)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    module = torch.nn.Module()
    mask = fi.FastlabMask(False, torch.tensor([5, 3]), 5)
    fi.fastlab_attention_forward(module, q, k, k, mask)
    fi.fastlab_attention_forward(module, q, k[:, :, :4], k[:, :, :4],
                                 fi.FastlabMask(False, torch.tensor([4, 3]), 5))
    fi.fastlab_attention_forward(module, q, k, k, fi.FastlabMask(False, torch.tensor([5, 3])))
    fi.fastlab_attention_forward(module, q, k, k, None)
    assert seen == [False, True, True, True]


def test_mask_builder_cases():
    """What each 2-D mask becomes, and what is refused, straight from the mask builder."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            sliding_window_causal_mask_function)

    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    full = torch.ones(2, 5, dtype=torch.long)
    causal = dict(batch_size=2, mask_function=causal_mask_function)
    bidirectional = dict(batch_size=2, mask_function=bidirectional_mask_function)
    assert fi.fastlab_attention_mask(q_length=5, kv_length=5, attention_mask=full,
                                     **causal) == fi.FastlabMask(True, None)
    assert fi.fastlab_attention_mask(q_length=5, kv_length=5, attention_mask=right,
                                     **causal) == fi.FastlabMask(True, None)
    decode = fi.fastlab_attention_mask(q_length=1, kv_length=5, q_offset=4, **causal)
    assert decode == fi.FastlabMask(True, None)
    static = fi.fastlab_attention_mask(q_length=1, kv_length=8, q_offset=4,
                                       attention_mask=full, **causal)
    assert static.causal and static.kv_lens.tolist() == [5, 5] and static.longest == 5
    padded = fi.fastlab_attention_mask(q_length=5, kv_length=5, attention_mask=right,
                                       **bidirectional)
    assert not padded.causal and padded.kv_lens.tolist() == [5, 3] and padded.longest == 5
    with pytest.raises(ValueError, match="padding together with a KV cache"):
        fi.fastlab_attention_mask(q_length=1, kv_length=5, q_offset=4, attention_mask=right,
                                  **causal)
    with pytest.raises(ValueError, match="left padding or gaps"):
        fi.fastlab_attention_mask(q_length=5, kv_length=5, attention_mask=right.flip(-1),
                                  **bidirectional)
    with pytest.raises(ValueError, match="sliding window"):
        fi.fastlab_attention_mask(batch_size=2, q_length=5, kv_length=5,
                                  mask_function=sliding_window_causal_mask_function(2))
    with pytest.raises(ValueError, match="key offset"):
        fi.fastlab_attention_mask(q_length=1, kv_length=4, q_offset=6, kv_offset=3, **causal)


def test_triton_kernels_in_the_interpreter():
    """The kernel side of both ops, run by Triton's CPU interpreter (tests/conftest.py)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (a GPU is present): GPU tests cover it")
    model = _build("llama", num_hidden_layers=1)
    ids, mask, labels = _batch("llama", "right", batch=2, seq=9)
    want, want_grads = _loss_and_grads(model, ids, mask, labels)
    fi.patch(model)
    with backend("kernel"):
        got, got_grads = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(got.loss, want.loss, **LOSS_TOL)
    _assert_same_grads(got_grads, want_grads)


def test_fastlab_adamw_as_the_trainers_optimizer(tmp_path):
    """Three Trainer steps with fastlab's AdamW (optimizer_cls_and_kwargs) on a patched model
    end with the weights of three plain steps of torch's AdamW on the unpatched model. Each
    step takes the whole dataset, so the order the Trainer draws it in does not matter."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    from fastlab.optim import AdamW

    ids, mask, labels = _batch("llama", "right", batch=4)
    rows = [dict(input_ids=i, attention_mask=m, labels=t) for i, m, t in zip(ids, mask, labels)]
    # eps well above the gradients' rounding noise: with 1e-8, a gradient that is 0 in exact
    # math moves its weight by up to lr in either direction, as rounding decides
    options = dict(lr=1e-2, eps=1e-4, weight_decay=0.0)
    model = _build("llama")
    fi.patch(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             max_steps=3, lr_scheduler_type="constant", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True,
                             max_grad_norm=0.0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      optimizer_cls_and_kwargs=(AdamW, options))
    trainer.train()
    # accelerate wraps the optimizer it is given
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), AdamW)
    assert len([log for log in trainer.state.log_history if "loss" in log]) == 3

    reference = _build("llama")
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)  # it trained
    optimizer = torch.optim.AdamW(reference.parameters(), **options)
    for _ in range(3):
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fastlab_outside_integrations_does_not_import_transformers():
    import ast
    import pathlib

    import fastlab

    root = pathlib.Path(fastlab.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "integrations" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "transformers" or n.startswith("transformers.") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []
