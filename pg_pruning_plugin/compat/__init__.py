"""Workarounds for third-party libraries, one module per pinned library (docs/torch_pruning.md,
docs/llmcompressor.md). Nothing here patches the libraries themselves."""
