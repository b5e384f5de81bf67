"""Small reference models built on fastlab.nn."""
from fastlab.models.generate import generate, sample
from fastlab.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "generate", "sample"]
