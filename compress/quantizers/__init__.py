"""Quantization algorithms. Importing this package registers every built-in method."""
from compress.quantizers import gptq, rtn  # noqa: F401  (register "gptq" and "rtn")
from compress.quantizers.base import QUANTIZERS, QuantSpec, Quantizer, get_quantizer, register

__all__ = ["QUANTIZERS", "QuantSpec", "Quantizer", "get_quantizer", "register"]
