"""Serving pruned models outside transformers: GGUF files for llama.cpp with per-layer widths
(gguf.py) and the llama.cpp runtime check through node-llama-cpp (llama_cpp.py); docs/serving.md."""

from .gguf import (
    GGUF_DTYPES,
    GGUF_FAMILIES,
    LayerPlan,
    check_gguf_output,
    check_unquantized,
    export_gguf,
    gguf_layer_plan,
    permute_for_llama_cpp_rope,
)
from .llama_cpp import (
                        NODE_LLAMA_CPP_ENV,
                        NODE_LLAMA_CPP_VERSION,
                        Comparison,
                        LlamaCppUnavailable,
                        compare_with_llama_cpp,
                        find_node_llama_cpp,
                        llama_cpp_greedy,
)

__all__ = ["GGUF_DTYPES", "GGUF_FAMILIES", "NODE_LLAMA_CPP_ENV", "NODE_LLAMA_CPP_VERSION", "Comparison", "LayerPlan",
           "LlamaCppUnavailable", "check_gguf_output", "check_unquantized", "compare_with_llama_cpp", "export_gguf",
           "find_node_llama_cpp", "gguf_layer_plan", "llama_cpp_greedy", "permute_for_llama_cpp_rope"]
