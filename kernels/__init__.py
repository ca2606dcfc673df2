"""Triton kernels of tritskip (installed as ``tritskip.kernels``): ``@triton.jit`` code, launch
wrappers and tuning configs only. Importing this package requires Triton."""
