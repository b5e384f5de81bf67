"""The functional API: validation, autograd, dispatch and the plain-PyTorch references.

CUDA tensors run the Triton/CUDA kernels, CPU tensors the references; ``backend("kernel")``
or ``backend("reference")`` forces either side (tests use it to run the Triton kernels on
CPU under ``TRITON_INTERPRET=1``).
"""
from fastlab.ops._dispatch import backend
from fastlab.ops.attention import (attention, attention_ref, attention_varlen,
                                   attention_varlen_ref)
from fastlab.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlab.ops.fused_linear_cross_entropy import (fused_linear_cross_entropy,
                                                    fused_linear_cross_entropy_ref)
from fastlab.ops.kvcache import attention_with_kvcache, attention_with_kvcache_ref
from fastlab.ops.rms_norm import rms_norm, rms_norm_ref
from fastlab.ops.rope import apply_rotary, apply_rotary_ref
from fastlab.ops.segment_pool import (hierarchical_pool, lengths_from_offsets, offsets_from_lengths,
                                      offsets_from_mask, padded_to_ragged, ragged_to_padded,
                                      segment_broadcast, segment_broadcast_ref, segment_ids,
                                      segment_pool, segment_pool_ref)
from fastlab.ops.swiglu import swiglu, swiglu_ref

__all__ = ["backend", "attention", "attention_ref", "attention_varlen", "attention_varlen_ref",
           "cross_entropy", "cross_entropy_ref",
           "fused_linear_cross_entropy", "fused_linear_cross_entropy_ref",
           "attention_with_kvcache", "attention_with_kvcache_ref", "segment_pool",
           "segment_pool_ref", "segment_broadcast", "segment_broadcast_ref", "hierarchical_pool",
           "offsets_from_lengths", "lengths_from_offsets", "offsets_from_mask", "segment_ids",
           "ragged_to_padded", "padded_to_ragged", "rms_norm", "rms_norm_ref", "apply_rotary",
           "apply_rotary_ref", "swiglu", "swiglu_ref"]
