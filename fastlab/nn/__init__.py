"""Drop-in modules built on fastlab.ops."""
from fastlab.nn.attention import Attention
from fastlab.nn.cross_entropy import CrossEntropyLoss
from fastlab.nn.kvcache import KVCache

__all__ = ["Attention", "CrossEntropyLoss", "KVCache"]
