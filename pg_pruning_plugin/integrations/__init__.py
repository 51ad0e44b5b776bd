"""Integrations of the pruning engine with other toolkits: ``torch_pruning`` (an importance and a pruner)
and ``llmcompressor`` (a recipe modifier). Each subpackage imports its toolkit; nothing else here does."""
