"""Drop-in modules built on fastlab.ops."""
from fastlab.nn.attention import Attention
from fastlab.nn.cross_entropy import CrossEntropyLoss
from fastlab.nn.kvcache import KVCache
from fastlab.nn.pooling import HierarchicalPool

__all__ = ["Attention", "CrossEntropyLoss", "HierarchicalPool", "KVCache"]
