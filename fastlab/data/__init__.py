"""Data in: text, its tokens and units, and token files for language modelling.

:mod:`fastlab.data.text` (byte tokenizer, text and JSONL files, word and sentence offsets),
:mod:`fastlab.data.grammar` (a seeded English-like corpus, nothing downloaded) and
:mod:`fastlab.data.stream` (memory-mapped token files, windows gathered on a device).
"""
from fastlab.data.grammar import english_corpus
from fastlab.data.stream import TokenStream
from fastlab.data.text import (ByteTokenizer, read_documents, read_tokens, sentence_offsets,
                               text_offsets, word_offsets)

__all__ = ["ByteTokenizer", "TokenStream", "english_corpus", "read_documents", "read_tokens",
           "sentence_offsets", "text_offsets", "word_offsets"]
