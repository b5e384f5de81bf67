"""The mlm task: rows of whole sentences with real padding, BERT's 15% / 80-10-10 masking
on the device from (seed, step) alone, the loss at the selected positions only, the
held-out split, text files, option errors, and learning through the trainer."""
import json
import os

import pytest
import torch

from fastlab.data import english_corpus
from fastlab.tasks.base import ConfigError
from fastlab.tasks.mlm import IGNORE, TOKENIZER, MaskedLM, MLMConfig
from fastlab.train.config import ModelConfig, build_config
from fastlab.train.loop import train

CPU = torch.device("cpu")
SMALL = dict(corpus_paragraphs=200, seq_len=48)
TINY = ["task.name=mlm", "task.corpus_paragraphs=200", "train.device=cpu", "log.nvml=false",
        "log.progress=false", "model.n_layer=1", "model.n_head=2", "model.d_model=32"]


@pytest.fixture(scope="module")
def task():
    return MaskedLM(MLMConfig(**SMALL))


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _binomial_close(hits, total, p):
    """``hits`` of ``total`` within 5 standard deviations of the expected ``p * total``."""
    assert abs(hits - p * total) <= 5 * (total * p * (1 - p)) ** 0.5, (hits, p * total)


def test_rows_are_whole_sentences_between_cls_and_sep_then_padding(task):
    b = task.draw("train", torch.tensor(3), 512, CPU, seed=1)
    clean, kv_lens = b["clean"], b["kv_lens"]
    assert clean.shape == (512, 48) and kv_lens.shape == (512,)
    for row, n in zip(clean.tolist(), kv_lens.tolist()):
        assert row[0] == TOKENIZER.CLS and row[n - 1] == TOKENIZER.SEP
        assert row[n:] == [TOKENIZER.PAD] * (48 - n)  # padding only after [SEP]
        text = TOKENIZER.decode(row[1:n - 1])
        assert max(row[1:n - 1]) < 256 and text == text.lstrip()
        if n - 2 < 46:  # not cut to fit: whole sentences
            assert text[-1] in ".!?" and text == text.strip()
    assert (kv_lens < 48).float().mean() > 0.5  # most rows end in real padding


def test_masking_selects_15_percent_of_text_and_replaces_80_10_10():
    task = MaskedLM(MLMConfig(**SMALL))
    batches = [task.draw("train", torch.tensor(s), 2048, CPU, seed=7) for s in range(3)]
    n_text = sum(int((b["kv_lens"] - 2).sum()) for b in batches)
    selected = original = replaced = 0
    for b in batches:
        used = b["labels"] != IGNORE
        pos = b["positions"]
        # never [CLS], [SEP] or padding: only text positions 1 .. kv_len - 2
        assert ((pos[used] >= 1) & (pos <= b["kv_lens"][:, None] - 2)[used]).all()
        assert (b["clean"].gather(1, pos)[used] < 256).all()
        # each used slot is a distinct position and its label the clean token there
        assert all(len(set(p)) == len(p) for p in pos.tolist())
        assert torch.equal(b["labels"][used], b["clean"].gather(1, pos)[used])
        # outside the selected positions the input is the clean row
        chosen = torch.zeros_like(b["clean"], dtype=torch.bool).scatter(1, pos, used)
        assert torch.equal(b["inputs"][~chosen], b["clean"][~chosen])
        new, old = b["inputs"].gather(1, pos)[used], b["labels"][used]
        selected += int(used.sum())
        original += int((new == TOKENIZER.MASK).sum())
        replaced += int(((new != TOKENIZER.MASK) & (new != old)).sum())
        assert (new[(new != TOKENIZER.MASK)] < 256).all()  # a random token is a byte
    # selected per row: 0.15 n rounded at random, so 15% of all text tokens in expectation
    assert abs(selected / n_text - 0.15) < 0.003, selected / n_text
    _binomial_close(original, selected, 0.8)
    _binomial_close(replaced, selected, 0.1 * 255 / 256)  # a random byte may be the old one
    kept = selected - original - replaced
    _binomial_close(kept, selected, 0.1 + 0.1 / 256)


def test_other_masking_options_are_followed():
    task = MaskedLM(MLMConfig(**SMALL, mask_prob=0.3, mask_replace=0.5, mask_random=0.0))
    b = task.draw("train", torch.tensor(0), 2048, CPU, seed=0)
    used = b["labels"] != IGNORE
    assert abs(int(used.sum()) / int((b["kv_lens"] - 2).sum()) - 0.3) < 0.005
    new = b["inputs"].gather(1, b["positions"])[used]
    _binomial_close(int((new == TOKENIZER.MASK).sum()), int(used.sum()), 0.5)
    assert torch.equal(new[new != TOKENIZER.MASK], b["labels"][used][new != TOKENIZER.MASK])


def test_batches_are_a_function_of_seed_and_step_and_never_read_the_host(task):
    a = task.batch(torch.tensor(5), 32, CPU, 1)
    assert set(a) == {"inputs", "kv_lens", "positions", "labels"}
    assert all(torch.equal(a[k], task.batch(torch.tensor(5), 32, CPU, 1)[k]) for k in a)
    assert all(torch.equal(a[k], MaskedLM(MLMConfig(**SMALL)).batch(
        torch.tensor(5), 32, CPU, 1)[k]) for k in a)  # nothing carried between calls
    for step, seed in ((6, 1), (5, 2), (5 + 2 ** 16, 1)):
        assert not torch.equal(a["inputs"], task.batch(torch.tensor(step), 32, CPU, seed)["inputs"])
    meta = torch.device("meta")  # no values: a batch that read one on the host would fail
    out = task.batch(torch.tensor(5, device=meta), 32, meta, 1)
    assert out["inputs"].shape == (32, 48) and out["labels"].shape == (32, task.n_predict)
    assert out["inputs"].is_meta


def test_held_out_documents_are_never_trained_on(task):
    c = task.corpus
    first_held = int(c.starts["held_out"].min())
    assert int((c.starts["train"] + c.lengths["train"]).max()) <= first_held
    # 200 paragraphs, 5% held out: the last 10 documents, every sentence of them
    paragraphs = english_corpus(200).split("\n\n")
    held_text = TOKENIZER.decode(c.tokens[first_held:].numpy())
    assert held_text.strip() == "".join(paragraphs[-10:]).strip()
    rows = torch.cat([b["clean"] for b in task.held_out_batches(300, CPU)])
    starts = {TOKENIZER.decode(r[1:9].numpy()) for r in rows}
    train_rows = task.draw("train", torch.tensor(0), 4096, CPU, 0)["clean"]
    assert all(TOKENIZER.decode(r[1:-1].numpy()).strip() not in held_text for r in train_rows[:200])
    assert len(starts) > 20


def test_padding_changes_no_real_output_and_the_loss_skips_ignored_slots(task):
    model = task.build_model(ModelConfig(n_layer=2, n_head=2, d_model=32)).eval()
    b = task.batch(torch.tensor(0), 16, CPU, 0)
    pad = torch.arange(48) >= b["kv_lens"][:, None]
    noisy = torch.where(pad, torch.randint(0, 260, b["inputs"].shape), b["inputs"])
    real = ~pad
    h1, h2 = (model.encoder(x, b["kv_lens"]) for x in (b["inputs"], noisy))
    torch.testing.assert_close(h1[real], h2[real])
    assert not torch.allclose(h1[pad], model.encoder(noisy, None)[pad])
    # the fused loss is the cross-entropy of the used slots, whatever the others point at
    loss = task.loss(model, b)
    logits = model(b["inputs"], b["kv_lens"], b["positions"])
    used = b["labels"] != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[used], b["labels"][used], reduction="sum")
    torch.testing.assert_close(loss.total, expected, rtol=1e-5, atol=1e-4)
    assert int(loss.count) == int(used.sum())
    moved = {**b, "positions": torch.where(used, b["positions"], 0)}
    torch.testing.assert_close(task.loss(model, moved).total, loss.total)


def test_text_and_jsonl_files(tmp_path):
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    txt = tmp_path / "one.txt"
    txt.write_text(text + "\n")
    task = MaskedLM(MLMConfig(data=str(txt), seq_len=40, held_out=0.1))
    assert task.corpus.rows("train") == 54 and task.corpus.rows("held_out") == 6
    row = task.draw("held_out", torch.tensor(0), 8, CPU, 0)["clean"][0]
    assert TOKENIZER.decode(row.numpy()).startswith("Sentence number 5")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"Doc {d}. It ends here."}) for d in range(20)))
    task = MaskedLM(MLMConfig(data=str(jsonl), field="body", seq_len=40))
    assert task.corpus.rows("held_out") == 2  # the last document's two sentences
    rows = task.draw("train", torch.tensor(0), 64, CPU, 0)
    for r, n in zip(rows["clean"], rows["kv_lens"]):  # rows never cross a document's end
        assert TOKENIZER.decode(r[1:n - 1].numpy()).count("Doc") <= 1
    with pytest.raises(ConfigError, match="task.field"):
        MaskedLM(MLMConfig(data=str(jsonl)))
    short = tmp_path / "short.txt"
    short.write_text("Only one sentence.")
    with pytest.raises(ConfigError, match="task.data.*too few"):
        MaskedLM(MLMConfig(data=str(short)))


@pytest.mark.parametrize("option, value", [
    ("mask_prob", "1.5"), ("mask_prob", "0"), ("mask_replace", "-0.1"), ("mask_random", "0.3"),
    ("seq_len", "4"), ("held_out", "0.9"), ("corpus_paragraphs", "1"), ("data", "/no/such.txt"),
])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ConfigError, match=f"task.{option}"):
        build_config(overrides=["task.name=mlm", f"task.{option}={value}"])


def test_thinker_arch_is_refused(task):
    with pytest.raises(ConfigError, match="model.arch"):
        task.build_model(ModelConfig(arch="thinker"))


def test_mlm_learns_through_the_trainer(tmp_path):
    # measured on a 2-core CPU: the masked loss, 4.5 over the first 20 steps, is 2.9 over
    # steps 100-120, and held-out masked accuracy is 0.19 (always predicting a space, the
    # most common byte of the held-out labels, scores 0.144)
    cfg = build_config(overrides=TINY + [
        "task.seq_len=32", "model.d_model=64", "model.dropout=0.1", "train.batch_size=32",
        "train.steps=120", "optim.lr=2e-3", "optim.warmup_steps=12", "log.every=20",
        "eval.every=120", "eval.samples=256", f"log.out_dir={tmp_path}"])
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    losses = [r["loss"] for r in _records(str(tmp_path / "run"), "train")]
    assert losses[0] > 4.0 and losses[-1] < 0.7 * losses[0], losses
    assert summary["final"]["masked_accuracy"] > 0.17


@pytest.mark.gpu
def test_mlm_trains_on_the_gpu_compiled_and_in_cuda_graphs(tmp_path):
    cfg = build_config(overrides=[
        "task.name=mlm", "task.corpus_paragraphs=400", "task.seq_len=128", "log.nvml=false",
        "log.progress=false", "train.device=cuda", "train.compile=on", "train.cuda_graphs=on",
        "model.n_layer=2", "model.d_model=128", "model.dropout=0.1", "train.batch_size=64",
        "train.steps=200", "optim.lr=1e-3", "optim.warmup_steps=20", "log.every=20",
        "eval.every=200", "eval.samples=512", f"log.out_dir={tmp_path}"])
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    losses = [r["loss"] for r in _records(str(tmp_path / "run"), "train")]
    assert summary["cuda_graphs"] and losses[-1] < 0.7 * losses[0], losses
    assert summary["final"]["masked_accuracy"] > 0.2
