"""The KV cache under its public name among the modules.

The class, its state and every operation that mutates it (append, truncate, reset, the
append fused into attention) live together in :mod:`fastlab.ops.kvcache`.
"""
from fastlab.ops.kvcache import KVCache

__all__ = ["KVCache"]
