"""peftlab: a parameter-efficient fine-tuning lab for causal language models."""

__version__ = "0.1.0"
