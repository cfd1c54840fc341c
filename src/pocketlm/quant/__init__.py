"""Weight quantization: the grid (``grid``) and the quantization methods built on it."""
from .grid import QuantSpec, QuantizedWeight, quantize_weight

__all__ = ["QuantSpec", "QuantizedWeight", "quantize_weight"]
