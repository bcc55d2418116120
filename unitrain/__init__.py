"""unitrain: train and fine-tune language models under explicit resource limits."""

__version__ = "0.1.0"
