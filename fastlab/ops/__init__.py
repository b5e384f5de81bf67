"""The functional API: validation, autograd, dispatch and the plain-PyTorch references.

CUDA tensors run the Triton/CUDA kernels, CPU tensors the references; ``backend("kernel")``
or ``backend("reference")`` forces either side (tests use it to run the Triton kernels on
CPU under ``TRITON_INTERPRET=1``).
"""
from fastlab.ops._dispatch import backend
from fastlab.ops.attention import attention, attention_ref
from fastlab.ops.cross_entropy import cross_entropy, cross_entropy_ref

__all__ = ["backend", "attention", "attention_ref", "cross_entropy", "cross_entropy_ref"]
