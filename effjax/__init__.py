"""effjax: efficient LM training and inference in JAX."""
__version__ = "0.1.0"
