"""Drop-in modules built on fastlab.ops."""
from fastlab.nn.attention import Attention

__all__ = ["Attention"]
