"""Measures of a model: generation, next-token scoring, batching, perplexity and accuracy."""
