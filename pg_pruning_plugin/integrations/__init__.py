"""Integrations of the pruning engine with other toolkits (Torch-Pruning, llmcompressor)."""
