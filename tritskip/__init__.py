"""tritskip: skip-connection blocks for PyTorch with fused Triton Linear epilogues."""

from .blocks import ConcatSkip, Parallel, Residual, SkipConnection, layer_scale, residual_stack
from .dense_chain import DenseChain, dense_chain
from .epilogue import ACTIVATIONS, Activation
from .functional import fused_linear, fused_linear_cat
from .graph_pass import explain, optimize
from .ops import triton_available, uses_triton
from .report import Report, Site

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "ConcatSkip",
    "DenseChain",
    "Parallel",
    "Report",
    "Residual",
    "Site",
    "SkipConnection",
    "dense_chain",
    "explain",
    "fused_linear",
    "fused_linear_cat",
    "layer_scale",
    "optimize",
    "residual_stack",
    "triton_available",
    "uses_triton",
]

__version__ = "0.1.0"
