"""Text in: a byte-level tokenizer, text and JSONL files to tokens, word and sentence units.

Tokens. :class:`ByteTokenizer` maps the UTF-8 bytes of a text to ids 0-255 unchanged and
adds special tokens above them (pad, bos, eos, mask), so any text round-trips without an
unknown token and a byte's id is the byte. Token arrays are numpy ``uint16``.

Files. :func:`read_documents` reads a plain-text file (one document) or a JSONL file (one
document per line, its text under ``field``); :func:`read_tokens` tokenises them into one
array with ``eos`` after each document. Errors name the file (and line).

Units. A hierarchical model reads bytes, pools them into words and words into sentences
(``fastlab.ops.hierarchical_pool``). :func:`word_offsets` and :func:`sentence_offsets` give
those units in the CSR layout of ``fastlab.ops.segment_pool``: ``offsets[0] == 0``,
``offsets[-1]`` the number of rows (bytes, or words), unit ``s`` the rows
``offsets[s]:offsets[s + 1]``. Every row belongs to a unit, so a word is a run of non-space
bytes together with the whitespace after it (leading whitespace joins the first word), and
punctuation belongs to its word ("dog," is one word). A sentence ends with the word whose
last non-space byte is ``.``, ``!`` or ``?``; words after the last one form one more
sentence. Offsets count bytes of the UTF-8 encoding, i.e. the positions of
:meth:`ByteTokenizer.encode` without bos/eos; for ASCII text they are character indices.
"""
import json
import os
from typing import List, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: ASCII whitespace: space, tab, newline, vertical tab, form feed, carriage return
WHITESPACE = b" \t\n\v\f\r"
#: the bytes that end a sentence when they end a word
SENTENCE_END = b".!?"


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then the special tokens ``pad`` (256), ``bos`` (257, also
    the classifier token), ``eos`` (258, also the separator) and ``mask`` (259).

    ``vocab_size`` is 260. No ``unk`` is needed: every text is a sequence of bytes.
    """

    PAD, BOS, EOS, MASK = 256, 257, 258, 259
    CLS, SEP = BOS, EOS
    SPECIALS = {"pad": PAD, "bos": BOS, "eos": EOS, "mask": MASK}
    vocab_size = 260

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """The ids of ``text`` (uint16), optionally with ``bos`` first and ``eos`` last."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
        parts = [np.array([self.BOS], np.uint16)] if bos else []
        parts.append(body)
        if eos:
            parts.append(np.array([self.EOS], np.uint16))
        return np.concatenate(parts)

    def decode(self, ids: Union[Sequence[int], np.ndarray], *, skip_special: bool = True
               ) -> str:
        """The text of ``ids``. Special tokens are dropped, or written as ``<pad>``,
        ``<bos>``, ... with ``skip_special=False``; bytes that are not valid UTF-8 (a cut
        character) become U+FFFD."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"ids must be a 1-D sequence of ints, got "
                            f"{ids.dtype} of shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        names = {v: f"<{k}>" for k, v in self.SPECIALS.items()}
        # the bytes between special tokens are decoded as one run each, so a multi-byte
        # character survives; every run after the first starts with its special token
        runs = np.split(ids, np.flatnonzero(ids >= 256))
        text = [runs[0].astype(np.uint8).tobytes().decode("utf-8", errors="replace")]
        for run in runs[1:]:
            if not skip_special:
                text.append(names[int(run[0])])
            text.append(run[1:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(text)


def _jsonl(path: PathLike) -> bool:
    return os.fspath(path).lower().endswith((".jsonl", ".ndjson"))


def read_documents(path: PathLike, *, field: str = "text") -> List[str]:
    """The documents of a text file: one for ``.txt`` (or any other suffix), one per
    non-blank line for ``.jsonl`` / ``.ndjson``, the string under ``field`` of each line's
    JSON object."""
    if not isinstance(field, str) or not field:
        raise ValueError(f"field must be a non-empty str, got {field!r}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"text file {name!r} does not exist or is not a file")
    with open(name, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not valid UTF-8 at byte {exc.start}") from None
    if not _jsonl(name):
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{name}:{number}: expected a JSON object with a {field!r} "
                             f"field")
        if not isinstance(record[field], str):
            raise ValueError(f"{name}:{number}: field {field!r} must be a string, got "
                             f"{type(record[field]).__name__}")
        documents.append(record[field])
    return documents


def read_tokens(path: PathLike, *, field: str = "text", eos: bool = True,
                tokenizer: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
    """The documents of ``path`` (see :func:`read_documents`) as one uint16 token array,
    ``eos`` after each document so a model sees where one ends."""
    documents = read_documents(path, field=field)
    if not documents:
        return np.zeros(0, np.uint16)
    return np.concatenate([tokenizer.encode(doc, eos=eos) for doc in documents])


def _words(data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Word offsets over the bytes ``data`` and the last non-space byte of each word."""
    space = np.isin(data, np.frombuffer(WHITESPACE, np.uint8))
    # a word starts where a non-space byte follows a space, except after leading
    # whitespace, which belongs to the first word (starting at 0)
    starts = np.flatnonzero(~space[1:] & space[:-1]) + 1
    starts = starts[starts > np.argmin(space)] if data.size else starts
    offsets = np.concatenate([[0], starts, [data.size]]) if data.size else np.zeros(1)
    # each word holds one run of non-space bytes, except a text of whitespace only (one
    # word, no run: its last byte is reported as 0, which ends no sentence)
    run_ends = np.flatnonzero(~space & np.append(space[1:], True))
    last = data[run_ends] if run_ends.size == offsets.size - 1 else np.zeros(1, np.uint8)
    return offsets.astype(np.int64), last


def _as_bytes(text: str) -> np.ndarray:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def word_offsets(text: str) -> np.ndarray:
    """CSR offsets (int64, ``(W + 1,)``) of the words of ``text`` over its UTF-8 bytes."""
    return _words(_as_bytes(text))[0]


def sentence_offsets(text: str) -> np.ndarray:
    """CSR offsets (int64, ``(S + 1,)``) of the sentences of ``text`` over its words (those
    of :func:`word_offsets`)."""
    return text_offsets(text)[1]


def text_offsets(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """Both levels at once: (word offsets over bytes, sentence offsets over words), the
    ``level_offsets`` of ``fastlab.ops.hierarchical_pool`` after the bytes are embedded."""
    words, ends = _words(_as_bytes(text))
    is_end = np.isin(ends, np.frombuffer(SENTENCE_END, np.uint8))
    n_words = words.size - 1
    sentence_ends = np.flatnonzero(is_end) + 1
    if n_words and (sentence_ends.size == 0 or sentence_ends[-1] != n_words):
        sentence_ends = np.concatenate([sentence_ends, [n_words]])
    return words, np.concatenate([[0], sentence_ends]).astype(np.int64)
