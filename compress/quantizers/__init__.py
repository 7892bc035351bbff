"""Quantization methods. Importing this package registers every built-in method."""
from compress.quantizers import awq, gptq, rtn, smoothquant  # noqa: F401  (register the built-in methods)
from compress.quantizers.base import (
    METHODS, LayerStats, Method, MethodConfig, QuantResult, QuantSpec, get_method, register_method,
)

__all__ = [
    "METHODS", "LayerStats", "Method", "MethodConfig", "QuantResult", "QuantSpec", "get_method",
    "register_method",
]
