"""Test setup: Triton kernels run through Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before Triton is first imported, since ``triton.jit`` reads it
when a kernel is defined. Tests marked ``triton`` run the forward and backward on the Triton
kernels; tests marked ``torch_op`` run the custom op with its PyTorch path (what compiled
graphs run on CPU); all others run what eager CPU users get, the in-place composition.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tritskip.ops import force_backend, triton_available


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (interpreter on CPU)")
    config.addinivalue_line("markers", "torch_op: runs the custom op's PyTorch path")


@pytest.fixture(autouse=True)
def _backend(request):
    if request.node.get_closest_marker("triton"):
        skip_without_triton()
        backend = "triton"
    elif request.node.get_closest_marker("torch_op"):
        backend = "torch"
    else:
        backend = "composite"
    with force_backend(backend):
        yield


def skip_without_triton():
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not triton_available() or not (interpreting or torch.cuda.is_available()):
        pytest.skip("needs Triton with TRITON_INTERPRET=1 or a GPU")


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 comparisons assume full-precision matmuls on both sides.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous
