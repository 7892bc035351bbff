"""compress: quantize a causal LM, export it, and measure what it cost."""

__version__ = "0.1.0"
