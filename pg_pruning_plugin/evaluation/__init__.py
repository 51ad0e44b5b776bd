"""Measuring models: perplexity, lm-eval zero-shot accuracy, and search and inference speed."""
