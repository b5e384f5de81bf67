"""Triton kernels of fastlab: ``@triton.jit`` functions and their launchers.

This folder imports torch and triton and nothing from fastlab, so other repositories can
vendor it as it is or import it as ``fastlab.kernels``. Each op has one file named after it;
the functional API with validation, autograd and the plain-PyTorch reference lives in
``fastlab.ops.<op>``.
"""
