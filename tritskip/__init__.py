"""tritskip: skip-connection blocks for PyTorch with fused Triton Linear epilogues."""

from .epilogue import ACTIVATIONS, Activation
from .functional import fused_linear, fused_linear_cat
from .ops import triton_available, uses_triton

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "fused_linear",
    "fused_linear_cat",
    "triton_available",
    "uses_triton",
]

__version__ = "0.1.0"
