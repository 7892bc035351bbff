"""Quantization algorithms. Importing this package registers every built-in method."""
from compress.quantizers import rtn  # noqa: F401  (registers "rtn")
from compress.quantizers.base import QUANTIZERS, QuantSpec, Quantizer, get_quantizer, register

__all__ = ["QUANTIZERS", "QuantSpec", "Quantizer", "get_quantizer", "register"]
