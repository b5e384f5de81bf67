"""The lm task and GPT-2's options: windows from (seed, step) that never reach the held-out
part, every data source (synthetic, grammar, token files, text), the fused loss against
materialised logits, presets, and learning through the trainer."""
import json
import math
import os

import numpy as np
import pytest
import torch

from fastlab.models.gpt import GPT, GPTConfig
from fastlab.tasks.base import ConfigError
from fastlab.tasks.lm import LanguageModel, LMConfig, synthetic_stream
from fastlab.train.config import PRESETS, build_config
from fastlab.train.loop import train

CPU = torch.device("cpu")


def _task(**kw) -> LanguageModel:
    base = {"data": "synthetic", "seq_len": 16, "vocab_size": 97, "synthetic_tokens": 5000}
    return LanguageModel(LMConfig(**{**base, **kw}))


def test_batch_is_a_function_of_seed_and_step_and_targets_are_the_next_tokens():
    task = _task()
    a = task.batch(torch.tensor(5), 32, CPU, seed=1)
    b = _task().batch(torch.tensor(5), 32, CPU, seed=1)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["inputs"], task.batch(torch.tensor(6), 32, CPU, 1)["inputs"])
    assert not torch.equal(a["inputs"], task.batch(torch.tensor(5), 32, CPU, 2)["inputs"])
    assert a["inputs"].shape == a["targets"].shape == (32, 16)
    assert a["inputs"].is_contiguous() and a["targets"].is_contiguous()
    assert torch.equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    stream = torch.from_numpy(task.tokens.astype(np.int64))
    for row, target in zip(a["inputs"], a["targets"]):  # each row is a window of the stream
        windows = stream.unfold(0, 16, 1)
        starts = torch.nonzero((windows == row).all(1)).flatten()
        assert any(torch.equal(stream[s + 1:s + 17], target) for s in starts.tolist())


def test_training_windows_never_reach_the_held_out_part():
    task = _task(synthetic_tokens=2000, val_fraction=0.25)
    n_train = task.n_train
    assert n_train == 1500
    # mark every held-out token: no training window may contain one
    task.tokens = np.where(np.arange(len(task.tokens)) >= n_train, 96, 0).astype(np.uint16)
    for step in range(40):
        batch = task.batch(torch.tensor(step), 64, CPU, seed=step)
        assert (batch["inputs"] != 96).all() and (batch["targets"] != 96).all()
    starts = task.held_out_starts(50, CPU)
    assert int(starts.min()) == n_train and int(starts.max()) == len(task.tokens) - 17


def test_synthetic_stream_is_deterministic_and_has_its_successor_structure():
    a, b = synthetic_stream(10001, 500, seed=3), synthetic_stream(10001, 500, seed=3)
    assert np.array_equal(a, b) and a.dtype == np.uint16 and a.max() < 500
    assert not np.array_equal(a, synthetic_stream(10001, 500, seed=4))
    odd = np.arange(1, 10001, 2)
    follows = (a[odd - 1].astype(np.int64) * 7919 + 13) % 500 == a[odd]
    assert 0.45 < follows.mean() < 0.56  # half, plus chance agreements
    assert synthetic_stream(10, 70000).dtype == np.uint32


def test_token_files_npy_and_bin_with_the_vocabulary_inferred_or_checked(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, 4000).astype(np.uint16)
    tokens[7] = 999
    npy, raw = tmp_path / "t.npy", tmp_path / "t.bin"
    np.save(npy, tokens)
    tokens.astype("<u2").tofile(raw)
    for path in (npy, raw):
        task = LanguageModel(LMConfig(data=str(path), seq_len=32))
        assert task.vocab_size == 1024  # 999 + 1 rounded up to a multiple of 64
        assert np.array_equal(np.asarray(task.tokens), tokens)
    with pytest.raises(ConfigError, match="holds token 999"):
        LanguageModel(LMConfig(data=str(npy), seq_len=32, vocab_size=999))
    with pytest.raises(ConfigError, match="task.data: no such file"):
        LMConfig(data=str(tmp_path / "missing.bin"))
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ConfigError, match="whole number"):
        LanguageModel(LMConfig(data=str(tmp_path / "odd.bin")))
    with pytest.raises(ConfigError, match="too short"):
        LanguageModel(LMConfig(data=str(npy), seq_len=1000))


def test_text_and_jsonl_files_are_byte_tokens_with_a_text_form(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the cat sat on the mat. " * 60)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"line {i} of text here."})
                               for i in range(200)))
    task = LanguageModel(LMConfig(data=str(text), seq_len=24))
    assert task.vocab_size == 260
    assert task.decode_text(task.encode_text("the cat")) == "the cat"
    prompts, expected = task.example_prompts(3, CPU)
    assert prompts.shape == (3, 12) and all(isinstance(e, str) and e for e in expected)
    task = LanguageModel(LMConfig(data=str(jsonl), seq_len=24, field="body"))
    assert "line 1 of text here." in task.tokenizer.decode(task.tokens[:60].tolist())
    with pytest.raises(ConfigError, match="text form"):
        _task().encode_text("x")


def test_bad_options_name_the_option():
    for kw, match in [({"seq_len": 0}, "task.seq_len"), ({"val_fraction": 0.0}, "val_fraction"),
                      ({"dtype": "int8"}, "task.dtype"), ({"synthetic_tokens": 10},
                                                         "synthetic_tokens"),
                      ({"vocab_size": 1}, "task.vocab_size")]:
        with pytest.raises(ConfigError, match=match):
            LMConfig(**kw)
    with pytest.raises(ConfigError, match="model.preset"):
        build_config(overrides=["model.preset=gpt3"])
    with pytest.raises(ConfigError, match="model.bias"):
        build_config(overrides=["model.bias=true"])
    with pytest.raises(ConfigError, match="model.loss"):
        build_config(overrides=["model.loss=chunked"])
    with pytest.raises(ConfigError, match="model.recompute"):
        build_config(overrides=["model.recompute=all"])


def test_presets_set_the_size_and_explicit_options_win():
    cfg = build_config(overrides=["task.name=lm", "model.preset=gpt2"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model) == (12, 12, 768)
    cfg = build_config(overrides=["task.name=lm", "model.preset=gpt2", "model.n_layer=3"])
    assert (cfg.model.n_layer, cfg.model.d_model) == (3, 768)
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-cpu"}
    # GPT-2 small's size: 124M parameters with tied embeddings
    gpt = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768,
                        bias="all"))
    assert 124.0e6 < gpt.num_params(non_embedding=False) < 124.5e6


@pytest.mark.parametrize("bias, tie", [("all", True), ("none", False), ("mlp", True)])
def test_fused_loss_equals_the_logits_path_in_value_and_gradients(bias, tie):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=67, block_size=13, n_layer=2, n_head=2, d_model=16, bias=bias,
                    tie_embeddings=tie, loss="fused")
    fused = GPT(cfg)
    plain = GPT(GPTConfig(**{**cfg.__dict__, "loss": "logits"}))
    plain.load_state_dict(fused.state_dict())
    assert (fused.head.weight is fused.tok_emb.weight) == tie
    attn = fused.blocks[0].attn
    assert (attn.q_proj.bias is not None) == (bias == "all")
    assert (fused.blocks[0].mlp[0].bias is not None) == (bias != "none")
    assert (fused.ln_f.bias is not None) == (bias != "none")
    idx = torch.randint(0, 67, (3, 13))
    targets = torch.randint(0, 67, (3, 13))
    targets[0, :4] = -100
    for reduction in ("mean", "sum"):
        logits_f, loss_f = fused(idx, targets, reduction=reduction)
        logits_p, loss_p = plain(idx, targets, reduction=reduction)
        assert logits_f is None and logits_p.shape == (3, 13, 67)
        torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-5)
    fused.zero_grad(), plain.zero_grad()
    fused(idx, targets)[1].backward()
    plain(idx, targets)[1].backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def _saved_activation_bytes(model, idx, targets) -> int:
    """Bytes the compiled forward keeps for the backward, parameters not counted (the
    partitioner Inductor uses, on the plain-PyTorch graph)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    found = []

    def forward_compiler(gm, _):
        n_out = len(gm.graph.find_nodes(op="output")[0].args[0])
        saved = gm.graph.find_nodes(op="output")[0].args[0][1:n_out]
        found.append(sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in saved
                         if isinstance(n.meta.get("val"), torch.Tensor)
                         and not n.name.startswith("primals")))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler,
                           bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.compile(lambda i, t: model(i, t)[1], backend=backend)(idx, targets)
    loss.backward()
    torch._dynamo.reset()
    return found[0]


def test_pointwise_recompute_matches_and_keeps_fewer_activations():
    """model.recompute=pointwise: the same loss and gradients, eager and compiled; the
    compiled forward saves at most ~60% of the bytes (no LayerNorm outputs, no GELU output,
    no bf16 weight copies)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=67, block_size=32, n_layer=2, n_head=2, d_model=32, bias="all",
                    dropout=0.0)
    plain = GPT(cfg)
    recomputed = GPT(GPTConfig(**{**cfg.__dict__, "recompute": "pointwise"}))
    recomputed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 67, (4, 32))
    targets = torch.randint(0, 67, (4, 32))
    for model in (plain, recomputed):
        model.zero_grad()
        model(idx, targets)[1].backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    for model in (plain, recomputed):
        model.zero_grad(set_to_none=True)
    kept = _saved_activation_bytes(plain, idx, targets)
    grads = [p.grad.clone() for p in plain.parameters()]
    kept_recomputed = _saved_activation_bytes(recomputed, idx, targets)
    for (name, a), g in zip(recomputed.named_parameters(), grads):
        torch.testing.assert_close(a.grad, g, rtol=2e-2, atol=2e-3, msg=name)
    assert kept_recomputed < 0.6 * kept, (kept_recomputed, kept)
    with pytest.raises(ValueError, match="recompute"):
        GPTConfig(vocab_size=67, block_size=32, recompute="full")


def test_lm_learns_the_grammar_corpus_through_the_trainer(tmp_path):
    """A 1-layer model on the byte-level grammar corpus: from ln(260) = 5.56 nats the
    held-out loss falls below 3.4 within 120 steps (measured: 2.98)."""
    cfg = build_config(overrides=[
        "task.name=lm", "task.data=grammar", "task.corpus_paragraphs=300", "task.seq_len=32",
        "model.preset=gpt2-cpu", "model.n_layer=1", "model.d_model=64", "model.n_head=2",
        "train.steps=120", "train.batch_size=16", "train.device=cpu", "optim.lr=3e-3",
        "optim.warmup_steps=10", "eval.every=120", "eval.samples=32", "log.nvml=false",
        "log.progress=false", f"log.out_dir={tmp_path}", "log.name=lm"])
    summary = train(cfg)
    final = summary["final"]
    assert final["val_loss"] < 3.4, final
    assert math.isclose(final["perplexity"], math.exp(final["val_loss"]), rel_tol=1e-9)
    assert 0.0 < final["accuracy"] <= 1.0
    assert os.path.exists(tmp_path / "lm" / "metrics.jsonl")
