"""Integrations of fastlab with other libraries.

``fastlab.integrations.patch(model)`` puts fastlab's fused linear cross-entropy and attention
(and, in Llama-style models, RMSNorm, SwiGLU and RoPE) into a Hugging Face transformers
model (see :mod:`fastlab.integrations.hf`). This is the only place fastlab imports
transformers.
"""
from fastlab._hub_kernels import use_installed_kernels_package

# before transformers looks for the Hub's `kernels` package (see fastlab._hub_kernels)
use_installed_kernels_package()

try:
    from fastlab.integrations.hf import (ATTN_IMPLEMENTATION, Change, FastlabMask,
                                         causal_lm_loss, fastlab_attention_forward,
                                         fastlab_apply_rotary_pos_emb, fastlab_attention_mask,
                                         is_patched, patch, patch_bert,
                                         patch_gpt2, patch_llama, unpatch)
except ModuleNotFoundError as error:
    if error.name != "transformers" and not (error.name or "").startswith("transformers."):
        raise
    raise ModuleNotFoundError(
        "fastlab.integrations needs transformers: pip install transformers", name=error.name
    ) from error

__all__ = ["patch", "unpatch", "is_patched", "patch_llama", "patch_gpt2", "patch_bert",
           "Change", "FastlabMask", "causal_lm_loss", "fastlab_attention_forward",
           "fastlab_attention_mask", "fastlab_apply_rotary_pos_emb", "ATTN_IMPLEMENTATION"]
