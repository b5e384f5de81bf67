"""Small reference models built on fastlab.nn."""
from fastlab.models.generate import generate, sample
from fastlab.models.gpt import GPT, GPTConfig
from fastlab.models.thinker import PLANS, Thinker, ThinkerConfig

__all__ = ["GPT", "GPTConfig", "PLANS", "Thinker", "ThinkerConfig", "generate", "sample"]
