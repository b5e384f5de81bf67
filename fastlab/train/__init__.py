"""The lean trainer: ``python -m fastlab.train``."""
