"""tritskip: skip-connection blocks for PyTorch with fused Triton Linear epilogues."""

from .blocks import ConcatSkip, Parallel, Residual, SkipConnection, layer_scale, residual_stack
from .dense_chain import DenseChain, dense_chain
from .epilogue import ACTIVATIONS, Activation
from .functional import fused_linear, fused_linear_cat
from .ops import triton_available, uses_triton

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ConcatSkip",
    "DenseChain",
    "Parallel",
    "Residual",
    "SkipConnection",
    "dense_chain",
    "fused_linear",
    "fused_linear_cat",
    "layer_scale",
    "residual_stack",
    "triton_available",
    "uses_triton",
]

__version__ = "0.1.0"
