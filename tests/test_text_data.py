"""Text input: tokenizer round trips, files, the grammar corpus, units and token streams."""
import json
import re

import numpy as np
import pytest
import torch

from fastlab._ext import extension_available
from fastlab.data import (ByteTokenizer, TokenStream, english_corpus, grammar, read_documents,
                          read_tokens, sentence_offsets, text_offsets, word_offsets)
from fastlab.ops import hierarchical_pool

TOK = ByteTokenizer()
TEXTS = ["", "a", "Hello, world.", "naïve café — 日本語 🌍!", "tab\tand\nnew line\r\n",
         "\x00\x7f control bytes"]


# --- tokenizer -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_utf8(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    framed = TOK.encode(text, bos=True, eos=True)
    assert framed[0] == TOK.BOS and framed[-1] == TOK.EOS and framed.size == ids.size + 2
    assert TOK.decode(framed) == text
    assert TOK.decode(framed, skip_special=False) == f"<bos>{text}<eos>"


def test_tokenizer_specials_and_errors():
    assert TOK.vocab_size == 260 and max(TOK.SPECIALS.values()) == TOK.vocab_size - 1
    assert (TOK.CLS, TOK.SEP) == (TOK.BOS, TOK.EOS)
    assert len(set(TOK.SPECIALS.values())) == 4 and min(TOK.SPECIALS.values()) == 256
    # a special token between the bytes of one character keeps the character whole
    ids = np.concatenate([TOK.encode("é"), [TOK.MASK], TOK.encode("ü")])
    assert TOK.decode(ids) == "éü" and TOK.decode(ids, skip_special=False) == "é<mask>ü"
    assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"  # a cut character
    with pytest.raises(TypeError, match="text must be a str"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 260\)"):
        TOK.decode([65, 260])
    with pytest.raises(TypeError, match="ids must be a 1-D"):
        TOK.decode([[65]])


# --- files ---------------------------------------------------------------------------------

def test_read_txt_and_jsonl(tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("First line.\nSecond — line.\n", encoding="utf-8")
    assert read_documents(txt) == ["First line.\nSecond — line.\n"]
    tokens = read_tokens(txt)
    assert tokens.dtype == np.uint16 and tokens[-1] == TOK.EOS
    assert TOK.decode(tokens) == "First line.\nSecond — line.\n"

    jsonl = tmp_path / "docs.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "twö"}, {"body": "x", "text": ""}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_documents(jsonl) == ["one", "twö", ""]
    tokens = read_tokens(jsonl)
    assert (tokens == TOK.EOS).sum() == 3
    assert TOK.decode(tokens, skip_special=False) == "one<eos>twö<eos><eos>"
    assert read_tokens(jsonl, eos=False).tolist() == list("onetwö".encode())

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"content": "hi"}) + "\n")
    assert read_documents(other, field="content") == ["hi"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert read_tokens(empty).size == 0


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_documents(bad)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: expected a JSON object with a "
                                         r"'text' field"):
        read_documents(no_field)
    not_str = tmp_path / "number.jsonl"
    not_str.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"number\.jsonl:1: field 'text' must be a string"):
        read_documents(not_str)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte 3"):
        read_documents(latin)
    with pytest.raises(ValueError, match="field must be"):
        read_documents(bad, field="")


# --- grammar corpus ------------------------------------------------------------------------

def test_corpus_is_deterministic_per_seed():
    a = english_corpus(12, seed=3)
    assert a == english_corpus(12, seed=3)
    assert a != english_corpus(12, seed=4)
    # a longer corpus of the same seed continues the same paragraphs
    assert english_corpus(20, seed=3).startswith(a[:-1])
    assert english_corpus(0) == ""
    with pytest.raises(ValueError, match="sentences_per_paragraph"):
        english_corpus(2, sentences_per_paragraph=(3, 2))
    with pytest.raises(ValueError, match="n_paragraphs"):
        english_corpus(-1)


def test_corpus_is_english_like():
    text = english_corpus(40, seed=0, sentences_per_paragraph=(2, 5))
    assert text.endswith("\n") and text.isascii()
    paragraphs = text[:-1].split("\n\n")
    assert len(paragraphs) == 40
    vocabulary = ({w for pair in grammar.NOUNS for w in pair}
                  | {w for verb in grammar.TRANSITIVE_VERBS + grammar.INTRANSITIVE_VERBS
                     for w in verb}
                  | set(grammar.ADJECTIVES + grammar.ADVERBS + grammar.PREPOSITIONS
                        + grammar.CONJUNCTIONS + grammar.SINGULAR_DETERMINERS
                        + grammar.PLURAL_DETERMINERS) | {"an", "did", "do", "does"})
    ends = set()
    for paragraph in paragraphs:
        sentences = re.split(r"(?<=[.!?]) ", paragraph)  # sentences joined by one space
        assert all(re.fullmatch(r"[^.!?]+[.!?]", s) for s in sentences)
        assert 2 <= len(sentences) <= 5
        for sentence in sentences:
            assert sentence[0].isupper() and "  " not in sentence
            ends.add(sentence[-1])
            words = sentence[:-1].replace(",", "").lower().split(" ")
            assert len(words) >= 3 and set(words) <= vocabulary
            # "a" / "an" agree with the next word
            for article, following in zip(words, words[1:]):
                if article in ("a", "an"):
                    assert (article == "an") == (following[0] in "aeiou")
    assert ends == {".", "!", "?"}
    assert "," in text


# --- units ---------------------------------------------------------------------------------

def _check_units(text):
    words, sentences = text_offsets(text)
    data = text.encode("utf-8")
    assert words.dtype == sentences.dtype == np.int64
    assert words[0] == 0 and words[-1] == len(data) and np.all(np.diff(words) > 0)
    assert sentences[0] == 0 and sentences[-1] == words.size - 1
    assert np.all(np.diff(sentences) > 0)
    pieces = [data[a:b] for a, b in zip(words[:-1], words[1:])]
    assert b"".join(pieces) == data
    if data.strip():
        assert [p.strip() for p in pieces] == data.split()  # one word each
    for a, b in zip(sentences[:-1], sentences[1:]):
        sentence = b"".join(pieces[a:b]).strip()
        inner = [p.strip()[-1:] for p in pieces[a:b - 1]]
        assert not any(c in (b".", b"!", b"?") for c in inner)  # ends only at its last word
        if b < len(pieces):
            assert sentence[-1:] in (b".", b"!", b"?")
    assert np.array_equal(word_offsets(text), words)
    assert np.array_equal(sentence_offsets(text), sentences)
    return words, sentences


@pytest.mark.parametrize("text", ["The dog ran. A cat sat!  Why?\n\nno end", "  leading. x",
                                  "one", "trailing.  \n", "héllo wörld. ok", "a. b. c."])
def test_units_tile_the_text(text):
    _check_units(text)


def test_units_of_the_corpus_and_edge_cases():
    text = english_corpus(10, seed=1)
    words, sentences = _check_units(text)
    assert words.size - 1 == len(text.split())
    assert sentences.size - 1 == len(re.findall(r"[.!?]", text))
    assert text_offsets("")[0].tolist() == [0] and text_offsets("")[1].tolist() == [0]
    assert [o.tolist() for o in text_offsets("   ")] == [[0, 3], [0, 1]]
    assert word_offsets("  a b").tolist() == [0, 4, 5]  # leading space joins the first word


@pytest.mark.skipif(not extension_available(),
                    reason="fastlab._C is not built (python setup.py build_ext)")
def test_units_drive_hierarchical_pooling():
    text = "The old dog slept. Two cats sang, and a bird ran!"
    words, sentences = text_offsets(text)
    x = torch.randn(len(text.encode()), 6, dtype=torch.float64)
    by_word, by_sentence = hierarchical_pool(
        x, [torch.from_numpy(words), torch.from_numpy(sentences)], "sum")
    assert by_word.shape == (words.size - 1, 6) and by_sentence.shape == (2, 6)
    torch.testing.assert_close(by_sentence.sum(0), x.sum(0))
    torch.testing.assert_close(by_word[1], x[words[1]:words[2]].sum(0))


# --- token streams -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_stream_windows(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    high = 65536 if dtype == np.uint16 else 2**32
    tokens = rng.integers(0, high, size=1001, dtype=np.uint64).astype(dtype)
    tokens[:3] = [0, high - 1, high // 2]  # values that need all bits
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
        stream = TokenStream(path)
    else:
        tokens.tofile(path)
        stream = TokenStream(path, np.dtype(dtype).name)
    assert len(stream) == 1001 and stream.dtype == dtype
    starts = torch.tensor([0, 1, 500, 993, 2000, -4])  # the last two are clamped
    expected = np.stack([tokens[s:s + 8] for s in (0, 1, 500, 993, 993, 0)]).astype(np.int64)
    host = stream.window(starts, 8)
    assert host.dtype == torch.int64 and host.shape == (6, 8)
    assert np.array_equal(host.numpy(), expected)
    resident = stream.to("cpu").window(starts.int(), 8)
    assert np.array_equal(resident.numpy(), expected)


def test_token_stream_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        TokenStream(tmp_path / "nothing.bin", "uint16")
    raw = tmp_path / "odd.bin"
    raw.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"odd\.bin: a raw token file needs dtype"):
        TokenStream(raw)
    with pytest.raises(ValueError, match=r"odd\.bin: 3 bytes is not a whole number"):
        TokenStream(raw, "uint16")
    with pytest.raises(TypeError, match="dtype must be uint16 or uint32"):
        TokenStream(raw, "int64")
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"floats\.npy: expected a 1-D uint16 or uint32"):
        TokenStream(floats)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match=r"wide\.npy: holds uint32 tokens"):
        TokenStream(wide, "uint16")
    stream = TokenStream(wide)
    with pytest.raises(ValueError, match="length must be"):
        stream.window(torch.tensor([0]), 5)
    with pytest.raises(TypeError, match="starts must be"):
        stream.window(torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match="starts must be 1-D"):
        stream.window(torch.tensor([[0]]), 2)
