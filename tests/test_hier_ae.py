"""The hier_ae task: units that are the text's words and sentences, batches from (seed, step)
alone, the ragged and padded layouts (and both attentions) computing one loss, options
checked, every per-level loss logged and falling through the trainer."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from fastlab.data import english_corpus, sentence_offsets, text_offsets, word_offsets
from fastlab.models.hier_ae import PAD, unit_attention
from fastlab.tasks import build_task
from fastlab.tasks.base import ConfigError
from fastlab.tasks.hier_ae import (HierarchicalAutoencoder, HierarchicalAutoencoderConfig,
                                   corpus_units, padded_hierarchy, ragged_hierarchy)
from fastlab.train.config import ModelConfig, build_config
from fastlab.train.loop import train

CPU = torch.device("cpu")
TEXT = ("The old dog sees a cat. Did the birds sing?  Two horses ran quickly!\n\n"
        "A clever owl reads the ancient book, and the children laugh. Some trees fall.\n")
#: a tiny model of three levels: bytes -> words -> sentences -> pairs of sentences
TINY = dict(sequence_lengths="16,16,2", vector_sizes="16,24,32,32", corpus_paragraphs=200)


def _task(**kwargs) -> HierarchicalAutoencoder:
    return HierarchicalAutoencoder(HierarchicalAutoencoderConfig(**{**TINY, **kwargs}))


def _model(task, n_layer=1):
    return task.build_model(ModelConfig(n_layer=n_layer))


def _text_file(tmp_path, text=TEXT) -> str:
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


def test_units_are_the_words_and_sentences_of_the_text(tmp_path):
    data, words, sentences = corpus_units([TEXT], 16, 16)
    assert data.tobytes() == TEXT.encode()
    assert (words == word_offsets(TEXT)).all() and (sentences == sentence_offsets(TEXT)).all()

    # a batch of every sentence in order, packed: bytes back to back, pooled into the
    # text's words and those into its sentences
    task = _task(data=_text_file(tmp_path, TEXT * 40), sequence_lengths="16,16,1")
    n = len(sentence_offsets(TEXT)) - 1
    batch = {"bytes": task.gather(torch.arange(n)), **task._masks(0, torch.tensor(0), n, CPU)}
    hierarchy, kept = ragged_hierarchy(batch, task.lengths, 64, 12)
    assert kept.all()
    chars, (by_word, by_sentence, _) = hierarchy.chars, hierarchy.levels
    n_bytes = len(TEXT.encode())
    assert bytes(chars[:n_bytes].tolist()).decode() == TEXT and (chars[n_bytes:] == PAD).all()
    n_words = len(word_offsets(TEXT)) - 1
    assert by_word.offsets[:n_words + 1].tolist() == word_offsets(TEXT).tolist()
    assert by_sentence.offsets[:n + 1].tolist() == sentence_offsets(TEXT).tolist()
    assert int(by_word.n_real) == n_bytes and int(by_sentence.n_real) == n_words
    # the rows left in each budget are padding at the end, in one last unit
    assert by_word.offsets[-2:].tolist() == [n_bytes, by_word.rows]
    assert by_sentence.offsets[-2:].tolist() == [n_words, by_sentence.rows]
    assert not by_word.real[n_bytes:].any() and by_word.real[:n_bytes].all()


def test_long_words_and_sentences_are_cut_to_their_level():
    text = "Supercalifragilistic words here. " + "a " * 9 + "end."
    data, words, sentences = corpus_units([text], 8, 4)
    lengths = np.diff(words)
    assert lengths.max() <= 8 and np.diff(sentences).max() <= 4
    assert lengths[:3].tolist() == [8, 8, 5]  # "Supercal", "ifragili", "stic "
    assert words[-1] == len(text) and sentences[-1] == len(words) - 1
    # every cut keeps the original boundaries: a subset of the new ones
    assert set(word_offsets(text).tolist()) <= set(words.tolist())
    word_starts = words[sentences]
    assert set(words[0:1].tolist() + [len(text)]) <= set(word_starts.tolist())


def test_documents_join_without_sharing_a_unit():
    docs = ["One dog runs.", "  Two cats sleep. Done"]
    data, words, sentences = corpus_units(docs, 16, 16)
    w0, s0 = text_offsets(docs[0])
    assert data.tobytes() == "".join(docs).encode()
    assert words[:len(w0)].tolist() == w0.tolist()
    assert sentences.tolist() == [0, 3, 6, 7]  # 3 words, 3 words, then "Done"


def test_batch_is_a_pure_function_of_seed_and_step():
    task = _task()
    a = task.batch(torch.tensor(7), 24, CPU, seed=3)
    again = _task().batch(torch.tensor(7), 24, CPU, seed=3)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["bytes"], task.batch(torch.tensor(8), 24, CPU, 3)["bytes"])
    assert not torch.equal(a["bytes"], task.batch(torch.tensor(7), 24, CPU, 4)["bytes"])
    assert a["bytes"].shape == (24, 16, 16) and a["mask_up"].shape == (24, 1)
    mask_share = float(a["mask0"].float().mean())
    assert 0.12 < mask_share < 0.18  # task.mlm_probability = 0.15


def test_batches_hold_whole_blocks_of_training_sentences():
    task = _task()
    first = task._host["sentences"]
    held = set(task._host["held_out"].tolist())
    rows = task.batch(torch.tensor(0), 64, CPU, 0)["bytes"]
    for step in range(1, 4):
        rows = torch.cat([rows, task.batch(torch.tensor(step), 64, CPU, 0)["bytes"]])
    data = task._host["data"].numpy().tobytes()
    texts = {}
    for s in range(task.n_sentences):
        span = task._host["words"][first[s]:first[s + 1] + 1]
        texts.setdefault(data[int(span[0]):int(span[-1])], set()).add(s // task.block)
    for row in rows.tolist():
        sentence = bytes(b for word in row for b in word if b != PAD)
        blocks = texts[sentence]  # every row is a whole sentence of the corpus
        assert not blocks <= held  # from a training block


@pytest.mark.parametrize("lengths, sizes", [("16,16,2", "16,24,32,32"),
                                            ("8,16,3,2", "16,16,24,24,32")])
def test_padded_layout_computes_the_ragged_loss(lengths, sizes):
    task = _task(sequence_lengths=lengths, vector_sizes=sizes)
    model = _model(task, n_layer=2).eval()
    batch = task.batch(torch.tensor(1), 13, CPU, seed=5)
    ragged, kept = ragged_hierarchy(batch, task.lengths, 128, 16)
    assert kept.all()
    a = task.reduce(model(ragged), kept)
    b = task.reduce(model(padded_hierarchy(batch, task.lengths)), kept)
    assert a.parts.keys() == b.parts.keys() and int(a.count) == int(b.count) == 13
    for name in a.parts:
        assert int(a.parts[name][1]) == int(b.parts[name][1]) > 0, name
        torch.testing.assert_close(a.parts[name][0], b.parts[name][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-4)


def test_varlen_attention_computes_the_banded_loss():
    task = _task()
    model = _model(task).eval()
    batch = task.batch(torch.tensor(2), 8, CPU, seed=1)
    banded, kept = ragged_hierarchy(batch, task.lengths, 64, 12, "banded")
    varlen, _ = ragged_hierarchy(batch, task.lengths, 64, 12, "varlen")
    a, b = task.reduce(model(banded), kept), task.reduce(model(varlen), kept)
    torch.testing.assert_close(a.total, b.total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_banded_attention_is_attention_inside_each_segment(causal):
    lengths = [3, 1, 5, 4, 2]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = (torch.randn(sum(lengths), 2, 4, dtype=torch.float64) for _ in range(3))
    out = unit_attention(q, k, v, segment, max(lengths), causal)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        scores = torch.einsum("ihd,jhd->hij", q[s], k[s]) / 2.0
        if causal:
            scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        expected = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[s])
        torch.testing.assert_close(out[s], expected)
        start += n


def test_sentences_past_the_budget_are_dropped_and_not_counted():
    task = _task()
    batch = task.batch(torch.tensor(0), 16, CPU, 0)
    hierarchy, kept = ragged_hierarchy(batch, task.lengths, 20, 12)  # ~45 bytes a sentence
    n = int(kept.sum())
    assert 0 < n < 16 and kept[:n].all() and not kept[n:].any()
    n_bytes = int((batch["bytes"][:n] != PAD).sum())
    assert int(hierarchy.levels[0].n_real) == n_bytes <= 16 * 20
    out = task.reduce(_model(task)(hierarchy), kept)
    assert int(out.count) == n and int(out.parts["reconstruction/0"][1]) == n_bytes


def test_dividing_by_log_vocab_puts_chance_near_one():
    task = _task(divide_by_log_vocab=True)
    model = _model(task)
    with torch.no_grad():
        out = task.loss(model, task.batch(torch.tensor(0), 32, CPU, 0))
    for level in range(task.levels):
        for kind in ("reconstruction", "mlm"):
            value, n = out.parts[f"{kind}/{level}"]
            assert 0.5 < float(value / n) < 1.5, (kind, level)


@pytest.mark.parametrize("kwargs, option", [
    ({"sequence_lengths": "16"}, "task.sequence_lengths"),
    ({"sequence_lengths": "16,x"}, "task.sequence_lengths"),
    ({"sequence_lengths": "16,0,2"}, "task.sequence_lengths"),
    ({"vector_sizes": "16,24,32"}, "task.vector_sizes"),
    ({"vector_sizes": "16,24,0,32"}, "task.vector_sizes"),
    ({"num_heads": "3"}, "task.num_heads"),
    ({"num_heads": "2,2"}, "task.num_heads"),
    ({"chars_per_sentence": 0}, "task.chars_per_sentence"),
    ({"chars_per_sentence": 257}, "task.chars_per_sentence"),
    ({"words_per_sentence": 17}, "task.words_per_sentence"),
    ({"mlm_probability": 1.0}, "task.mlm_probability"),
    ({"eos_weight": -1.0}, "task.eos_weight"),
    ({"attention": "flash"}, "task.attention"),
    ({"corpus_paragraphs": 0}, "task.corpus_paragraphs"),
])
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        HierarchicalAutoencoderConfig(**{**TINY, **kwargs})


def test_bad_data_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"task\.data"):
        _task(data=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match=r"task\.data.*too few"):
        _task(data=_text_file(tmp_path, "One sentence only."))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine."}\nnot json\n')
    with pytest.raises(ConfigError, match=r"task\.data.*bad\.jsonl:2"):
        _task(data=str(bad))


def test_jsonl_documents_under_the_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = english_corpus(60, seed=2).split("\n\n")
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    task = _task(data=str(path), field="body")
    assert task._host["data"].numpy().tobytes() == "".join(docs).encode()
    assert task.n_sentences == len(corpus_units(docs, 16, 16)[2]) - 1


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_learns_through_the_trainer_and_logs_every_level(tmp_path):
    # measured on a 2-core CPU (one thread: the run stays quick while other processes
    # load the cores): from step 10 to step 100 the loss falls from 7.44 to 5.22 and
    # reconstruction/0 from 1.03 to 0.48; held-out byte reconstruction accuracy 0.30;
    # about 15 s. Asserted with a margin.
    cfg = build_config(overrides=[
        "task.name=hier_ae", "task.sequence_lengths=16,16,2", "task.vector_sizes=16,24,32,32",
        "task.corpus_paragraphs=200", "model.n_layer=1", "train.device=cpu", "train.threads=1",
        "train.batch_size=16", "train.steps=100", "optim.lr=5e-3", "optim.warmup_steps=10",
        "log.every=10", "eval.every=100", "eval.samples=128", "log.nvml=false",
        "log.progress=false", f"log.out_dir={tmp_path}"])
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    records = _records(str(tmp_path / "run"), "train")
    for level in range(3):
        for kind in ("reconstruction", "mlm", "eos"):
            assert all(f"{kind}/{level}" in r for r in records), (kind, level)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert records[-1]["reconstruction/0"] < 0.6 * records[0]["reconstruction/0"]
    assert summary["final"]["accuracy"] > 0.2 and summary["final"]["kept"] == 1.0
    assert set(summary["final"]) >= {"accuracy", "accuracy/1", "accuracy/2", "eos_accuracy/0"}


def test_the_registry_builds_it_from_the_config():
    cfg = build_config(overrides=["task.name=hier_ae", "task.corpus_paragraphs=100",
                                  "task.sequence_lengths=16,16", "task.vector_sizes=8,8,8"])
    task = build_task(cfg.task)
    assert isinstance(task, HierarchicalAutoencoder) and task.levels == 2 and task.block == 1
    out = task.loss(task.build_model(cfg.model), task.batch(torch.tensor(0), 4, CPU))
    assert set(out.parts) == {f"{k}/{l}" for k in ("reconstruction", "mlm", "eos")
                              for l in (0, 1)}


@pytest.mark.gpu
def test_cuda_batches_and_losses_match_the_cpu():
    task = _task()
    model = _model(task).eval()
    cuda = torch.device("cuda")
    batch = task.batch(torch.tensor(3), 32, cuda, seed=2)
    cpu_batch = task.batch(torch.tensor(3), 32, CPU, seed=2)
    assert all(torch.equal(batch[k].cpu(), cpu_batch[k]) for k in batch)
    cpu_loss = task.loss(model, cpu_batch).total
    gpu_loss = task.loss(model.to(cuda), batch).total
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-3, atol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(task.loss(model, batch).total)


@pytest.mark.gpu
def test_the_loss_compiles_into_one_graph_on_cuda():
    task = _task()
    model = _model(task).cuda()
    batch = task.batch(torch.tensor(0), 32, torch.device("cuda"), seed=0)
    eager = task.loss(model, batch).total
    compiled = torch.compile(functools.partial(task.loss, model), fullgraph=True)(batch)
    torch.testing.assert_close(compiled.total, eager, rtol=1e-4, atol=1e-3)
