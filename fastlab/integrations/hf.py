"""fastlab inside Hugging Face transformers models: loss, attention, RMSNorm, SwiGLU, RoPE.

:func:`patch` changes one model instance, never a class, and returns the list of what it
changed; :func:`unpatch` puts every one of those things back as it was. Each part is
optional; the last three apply to Llama-style models only (GPT-2 and BERT keep their
LayerNorm, GELU MLP and position embeddings):

Loss (``loss=True``). The model's ``forward`` is replaced on the instance. When labels are
given and the logits are not needed, the backbone's last hidden states go straight into
:func:`fastlab.ops.fused_linear_cross_entropy` with the head's weight (and bias), so the
(tokens x vocabulary) logits are never materialised; the output then carries
``logits=None``. Which calls skip the logits is ``skip_logits``: ``None`` (default) skips
them in training mode only (evaluation loops usually want logits for their metrics),
``True`` whenever labels are given, ``False`` never. Calls that keep the logits run the
model's own forward, with the loss computed from those logits by
:func:`fastlab.ops.cross_entropy`. The model's conventions are kept: causal LMs shift the
labels by one inside (or take ``shift_labels``), honour ``ignore_index`` (-100) and
``num_items_in_batch`` (the Trainer's token count for gradient accumulation: a sum divided
by it); BERT's masked LM takes the mean over labels that are not -100. A call with
``logits_to_keep`` other than 0 runs the model's own forward.

Attention (``attention=True``). An attention function named ``"fastlab"`` is registered
in transformers' ``AttentionInterface`` (with its mask builder in
``AttentionMaskInterface``) and the model's attention implementation is switched to it,
as ``model.set_attn_implementation("fastlab")`` would. The mask builder turns the model's
2-D padding mask into what :func:`fastlab.ops.attention` takes:

- causal, no padding: ``causal=True`` (a KV cache's queries are the last ones, as the op
  aligns them bottom-right);
- causal, right padding (ones then zeros), no cache: ``causal=True`` alone. Every real
  token sees exactly what SDPA shows it (keys up to itself, all real). A padding query
  sees keys up to itself, real and padding, where SDPA shows it the real keys only: its
  output differs, it never reaches a real token, and its label is -100, so losses and
  gradients are SDPA's;
- bidirectional (BERT), right padding: ``kv_lens`` = the number of ones of each row,
  exact for every query, padding ones included.

It refuses, with a ValueError naming the cause: left padding or gaps in the padding mask,
padding together with a KV cache, a prepared 4-D mask, sliding windows, chunked or packed
sequence masks and custom mask functions, and attention sinks. Attention dropout (in
training) and a logit softcap pass through to the op. The op draws its dropout from a
counter-based hash seeded from torch's default generator, not from torch's dropout: the
same distribution, other draws, so a training step with dropout is not the unpatched
model's step element for element.
Checking the padding pattern costs one host sync per forward, in the mask builder (under
``torch.compile`` the check is skipped and right padding is assumed). The lengths it derives
are in range by construction, so the attention layers skip the op's own check of
``kv_lens`` (``validate=False``) and add no sync.

RMSNorm (``rms_norm=True``). Every RMSNorm module (a class named ``*RMSNorm`` with a 1-D
``weight`` and ``variance_epsilon``) gets a forward on the instance that calls
:func:`fastlab.ops.rms_norm`: LlamaRMSNorm's numerics, x and one fp32 value a row saved.

MLP (``mlp=True``). Every gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)
whose ``act_fn`` is SiLU gets a forward on the instance computing
``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with :func:`fastlab.ops.swiglu` (gate and
up saved, silu(gate) recomputed). Other activations are kept, and the change list says so.

RoPE (``rope=True``). transformers' Llama attention calls the module-level function
``apply_rotary_pos_emb`` of its modeling module by name. The class and the module are left
alone: each attention instance gets its own forward, a copy of the class's function (and of
the decorators around it) whose globals are a copy of the module's with that one name bound
to :func:`fastlab.ops.apply_rotary` (cos and sin saved, not q and k). Another model of the
same class keeps transformers' function; a later change to the module's other globals
(e.g. another library patching the module) is not seen by the patched instances until
they are unpatched.

Modules that already have a forward set on the instance (hooks, other patches) are left
alone and reported as kept.

Families: Llama-style causal LMs (``LlamaForCausalLM``), ``GPT2LMHeadModel`` and
``BertForMaskedLM``, and their subclasses.
"""
import dataclasses
import functools
import inspect
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                        causal_mask_function)
from transformers.modeling_outputs import (CausalLMOutputWithCrossAttentions,
                                           CausalLMOutputWithPast, MaskedLMOutput)

from fastlab.ops.attention import attention
from fastlab.ops.cross_entropy import cross_entropy
from fastlab.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastlab.ops.rms_norm import rms_norm as _rms_norm
from fastlab.ops.rope import apply_rotary
from fastlab.ops.swiglu import swiglu

#: Name of fastlab's entry in transformers' attention and mask registries.
ATTN_IMPLEMENTATION = "fastlab"
_STATE = "_fastlab_patch"
#: Dtypes autocast casts to its own (float64 stays float64, as in torch).
_AUTOCAST_CAST = (torch.float32, torch.bfloat16, torch.float16)
#: Keyword arguments of an attention call that the op cannot express.
_REFUSED_KWARGS = {
    "sliding_window": "a sliding window",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
    "cu_seq_lens_q": "packed sequences (cu_seq_lens)",
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One thing :func:`patch` changed on a model: where, what it was, what it is now."""

    target: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.target}: {self.before} -> {self.after}"


@dataclasses.dataclass(frozen=True)
class _Family:
    name: str
    classes: Tuple[str, ...]  # class names matched along the model's MRO
    backbone: str             # attribute holding the base model
    masked: bool              # masked LM (no label shift) rather than causal LM
    output: type
    llama_layers: bool = False  # RMSNorm, SwiGLU MLP and RoPE parts apply


_FAMILIES = (
    _Family("llama", ("LlamaForCausalLM",), "model", False, CausalLMOutputWithPast, True),
    _Family("gpt2", ("GPT2LMHeadModel",), "transformer", False,
            CausalLMOutputWithCrossAttentions),
    _Family("bert", ("BertForMaskedLM",), "bert", True, MaskedLMOutput),
)


def _family_of(model) -> Optional[_Family]:
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in _FAMILIES:
        if names.intersection(family.classes):
            return family
    return None


# ----------------------------------------------------------------------------- attention
@dataclasses.dataclass(frozen=True)
class FastlabMask:
    """What the ``"fastlab"`` mask builder hands every attention layer of one forward."""

    causal: bool
    kv_lens: Optional[torch.Tensor]
    #: a host-side bound of kv_lens' values, known by construction (None: unknown); where
    #: the keys are at least this long, the attention skips the op's own check and its sync
    longest: Optional[int] = None


def _refuse(what: str, hint: str = "") -> ValueError:
    return ValueError(f"fastlab attention cannot express {what}" + (f": {hint}" if hint else "")
                      + "; use attention=False in fastlab.integrations.patch, or another "
                      "attn_implementation, for this model")


def _right_padding_lengths(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(B,) number of ones of each row of a right-padded 2-D mask; None without padding."""
    mask = mask.to(torch.bool)
    lens = mask.sum(-1)
    if torch.compiler.is_compiling():
        return lens
    # Host sync (two bools, once per forward): refuse patterns kv_lens cannot hold.
    if bool(mask.all()):
        return None
    expected = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lens[:, None]
    if not torch.equal(mask, expected):
        raise _refuse("left padding or gaps in the attention mask",
                      "only right padding (ones, then zeros) maps to per-sequence key lengths")
    return lens


def _lengths(batch_size: int, n: int, device) -> torch.Tensor:
    return torch.full((batch_size,), n, dtype=torch.int64, device=device)


def fastlab_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                           kv_offset=0, mask_function: Callable = causal_mask_function,
                           attention_mask: Optional[torch.Tensor] = None, device=None,
                           **kwargs) -> FastlabMask:
    """Mask builder registered as ``"fastlab"`` in ``AttentionMaskInterface``.

    ``attention_mask`` is the 2-D padding mask over the keys seen so far; a static cache
    has more slots (``kv_length``) than that, and the slots past it are not written yet.
    """
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        raise _refuse("this mask (a sliding window, chunked or packed sequences, or a custom "
                      "mask function)", "only plain causal or bidirectional masks with right "
                      "padding are supported")
    if not isinstance(kv_offset, int) or kv_offset != 0:
        raise _refuse("a key offset (a sliding-window cache)")
    lens = None
    if attention_mask is not None:
        attention_mask = attention_mask[:, :kv_length]
        lens = _right_padding_lengths(attention_mask)
        device = attention_mask.device
    if not causal:
        width = kv_length if attention_mask is None else attention_mask.shape[-1]
        if lens is None and width < kv_length:
            lens = _lengths(batch_size, width, device)
        return FastlabMask(False, lens, None if lens is None else width)
    q_offset = int(q_offset)  # a tensor under a static cache: one host read, when decoding
    if lens is not None and q_offset != 0 and not torch.compiler.is_compiling():
        raise _refuse("padding together with a KV cache",
                      "generate with the model unpatched or without padding")
    # causal: every real query sees keys up to itself only, so right padding needs no
    # lengths; the first q_offset + q_length slots are the keys written so far
    n_keys = q_offset + q_length
    if n_keys == kv_length:
        return FastlabMask(True, None)
    return FastlabMask(True, _lengths(batch_size, n_keys, device), n_keys)


def fastlab_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask, dropout: float = 0.0,
                              scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                              **kwargs) -> Tuple[torch.Tensor, None]:
    """Attention function registered as ``"fastlab"`` in ``AttentionInterface``: (B, H, S, D)
    query, key and value (GQA as they come) -> ((B, S, H, D) output, None)."""
    for name, what in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise _refuse(what)
    if isinstance(attention_mask, FastlabMask):
        causal, kv_lens = attention_mask.causal, attention_mask.kv_lens
        # lengths from the mask builder are in range by construction when the keys are
        # as long as its bound: no need to read them back once per layer
        validate = attention_mask.longest is None or attention_mask.longest > key.shape[2]
    elif attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        kv_lens, validate = None, True
    else:
        raise _refuse(f"a prepared {attention_mask.dim()}-D attention mask",
                      "pass the 2-D padding mask (ones, then zeros) instead")
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # as torch's SDPA under autocast; the model's q and k can come out of RoPE in float32
        # (fp32 cos/sin times autocast's bf16 projections) beside a bf16 v
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) if t.dtype in _AUTOCAST_CAST else t
                             for t in (query, key, value))
    softcap = kwargs.get("softcap")
    out = attention(query, key, value, causal=bool(causal), scale=scaling, kv_lens=kv_lens,
                    dropout_p=float(dropout), softcap=0.0 if softcap is None else float(softcap),
                    validate=validate)
    return out.transpose(1, 2), None


def _register() -> List[Change]:
    """Register fastlab in transformers' registries (global, kept after unpatch)."""
    changes = []
    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not \
            fastlab_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, fastlab_attention_forward)
        changes.append(Change(f"transformers AttentionInterface[{ATTN_IMPLEMENTATION!r}]",
                              "absent", "fastlab_attention_forward (global, kept by unpatch)"))
    if AttentionMaskInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not \
            fastlab_attention_mask:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastlab_attention_mask)
        changes.append(Change(f"transformers AttentionMaskInterface[{ATTN_IMPLEMENTATION!r}]",
                              "absent", "fastlab_attention_mask (global, kept by unpatch)"))
    return changes


def _configs(model) -> List[object]:
    """Every config the model's modules hold (shared ones once), sub-configs included."""
    found: Dict[int, object] = {}
    pending = [m.config for m in model.modules() if hasattr(m, "config")]
    while pending:
        config = pending.pop()
        if id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key) for key in getattr(config, "sub_configs", {})
                       if getattr(config, key, None) is not None)
    return list(found.values())


def _check_attention_config(model) -> None:
    window = getattr(model.config, "sliding_window", None)
    if window is not None and getattr(model.config, "use_sliding_window", True):
        raise _refuse(f"a sliding window (config.sliding_window={window})")


def _patch_attention(model, restore: List[Callable[[], None]]) -> List[Change]:
    changes = _register()
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def put_back():
        for config, value in saved:
            config._attn_implementation_internal = value

    restore.append(put_back)
    layers = sorted({type(m).__name__ for m in model.modules()
                     if hasattr(m, "is_causal") and hasattr(m, "config")})
    count = sum(1 for m in model.modules() if type(m).__name__ in layers)
    changes.append(Change("config._attn_implementation", repr(before),
                          f"{ATTN_IMPLEMENTATION!r} ({count} modules: {', '.join(layers)})"))
    return changes


# ---------------------------------------------------------------- RMSNorm, MLP and RoPE
def _set_forward(module, forward, restore: List[Callable[[], None]]) -> None:
    module.forward = types.MethodType(forward, module)
    restore.append(lambda: module.__dict__.pop("forward", None))


def _patched_modules(model, matches: Callable, forward, restore, what: str) -> List[Change]:
    """Sets ``forward`` on every module ``matches`` accepts; one Change per class, plus one
    for the modules left alone because a forward is already set on the instance."""
    counts: Dict[str, int] = {}
    kept: Dict[str, int] = {}
    for module in model.modules():
        if not matches(module):
            continue
        name = type(module).__name__
        if "forward" in module.__dict__:  # a hook or another patch: not ours to replace
            kept[name] = kept.get(name, 0) + 1
            continue
        _set_forward(module, forward, restore)
        counts[name] = counts.get(name, 0) + 1
    changes = [Change(f"{name}.forward ({n} modules)", f"{name}.forward", f"fastlab {what}")
               for name, n in counts.items()]
    changes += [Change(f"{name}.forward ({n} modules)", "a forward set on the instance",
                       "kept (skipped: fastlab replaces only the class's forward)")
                for name, n in kept.items()]
    return changes


def _is_rms_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None),
                                                 float))


def _rms_norm_forward(self, hidden_states):
    """LlamaRMSNorm.forward through :func:`fastlab.ops.rms_norm` (same numerics)."""
    return _rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _is_gated_mlp(module) -> bool:
    return all(isinstance(getattr(module, name, None), torch.nn.Linear)
               for name in ("gate_proj", "up_proj", "down_proj")) and hasattr(module, "act_fn")


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _swiglu_mlp_forward(self, x):
    """LlamaMLP.forward with the gating ``act_fn(gate) * up`` in :func:`fastlab.ops.swiglu`."""
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _patch_rms_norm(model, restore) -> List[Change]:
    return _patched_modules(model, _is_rms_norm, _rms_norm_forward, restore,
                            "rms_norm (saves x and one fp32 value a row)")


def _patch_mlp(model, restore) -> List[Change]:
    changes = _patched_modules(model, lambda m: _is_gated_mlp(m) and _is_silu(m.act_fn),
                               _swiglu_mlp_forward, restore,
                               "swiglu between the projections (saves gate and up)")
    other: Dict[Tuple[str, str], int] = {}
    for module in model.modules():
        if _is_gated_mlp(module) and not _is_silu(module.act_fn):
            key = (type(module).__name__, type(module.act_fn).__name__)
            other[key] = other.get(key, 0) + 1
    changes += [Change(f"{name}.forward ({n} modules)", f"{name}.forward",
                       f"kept (skipped: act_fn is {act}, fastlab's swiglu is SiLU's)")
                for (name, act), n in other.items()]
    return changes


def fastlab_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` signature on :func:`fastlab.ops.apply_rotary`."""
    return apply_rotary(q, k, cos, sin, unsqueeze_dim)


_ROTARY_NAME = "apply_rotary_pos_emb"


def _calls_rotary(fn) -> bool:
    inner = inspect.unwrap(fn)
    return (_ROTARY_NAME in getattr(getattr(inner, "__code__", None), "co_names", ())
            and _ROTARY_NAME in getattr(inner, "__globals__", {}))


def _rebound(fn, names: dict):
    """A copy of ``fn`` whose global ``names`` are replaced: the innermost function of a
    decorator chain (``__wrapped__``) gets a copy of its module's globals with ``names``
    changed, and each wrapper above it a copy whose closure cell holding the function below
    points to the new copy. The module and the class are left untouched."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        scope = dict(fn.__globals__)
        scope.update(names)
        new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    else:
        cells = fn.__closure__ or ()
        if not any(c.cell_contents is inner for c in cells):
            raise ValueError(f"{fn.__qualname__}: a decorator that holds its function "
                             f"elsewhere than in its closure")
        new_inner = _rebound(inner, names)
        closure = tuple(types.CellType(new_inner) if c.cell_contents is inner else c
                        for c in cells)
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                 closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    if inner is not None:
        new.__wrapped__ = new_inner
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    return new


def _patch_rope(model, restore) -> List[Change]:
    """Attention modules whose class forward calls the module-level apply_rotary_pos_emb get
    a copy of that forward (on the instance) in which the name means fastlab's."""
    forwards: Dict[type, Callable] = {}
    changes = []
    for module in model.modules():
        cls = type(module)
        if cls not in forwards and _calls_rotary(cls.forward):
            try:
                forwards[cls] = _rebound(cls.forward,
                                         {_ROTARY_NAME: fastlab_apply_rotary_pos_emb})
            except ValueError as error:
                forwards[cls] = None
                changes.append(Change(f"{cls.__name__}.forward", f"{cls.__name__}.forward",
                                      f"kept (skipped: {error})"))
    rebuilt = {cls: fn for cls, fn in forwards.items() if fn is not None}
    for cls, fn in rebuilt.items():
        module_name = inspect.unwrap(cls.forward).__module__.rsplit(".", 1)[-1]
        changes += _patched_modules(
            model, lambda m, cls=cls: type(m) is cls, fn, restore,
            f"apply_rotary (this instance's forward calls it for {module_name}."
            f"{_ROTARY_NAME}; saves cos and sin only)")
    return changes


# ---------------------------------------------------------------------------------- loss
def _shifted(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Causal LM targets: token t predicts label t + 1; the last position predicts none."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _normalised(loss_sum_or_mean: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on fastlab's cross-entropy (for calls that keep the
    logits): same shift, ignore_index and ``num_items_in_batch`` normalisation."""
    if shift_labels is None:
        shift_labels = _shifted(labels, ignore_index)
    target = shift_labels.reshape(-1).to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = cross_entropy(logits.reshape(-1, vocab_size), target, ignore_index=ignore_index,
                         reduction=reduction)
    return _normalised(loss, num_items_in_batch)


def _fused_causal_loss(hidden, head, labels, extra) -> torch.Tensor:
    ignore_index = extra.get("ignore_index", -100)
    target = extra.get("shift_labels")
    if target is None:
        target = _shifted(labels, ignore_index)
    num_items = extra.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(hidden, head.weight, target.to(hidden.device), head.bias,
                                      ignore_index=ignore_index,
                                      reduction="mean" if num_items is None else "sum")
    return _normalised(loss, num_items)


def _wants_fused(model, skip_logits: Optional[bool], arguments: dict) -> bool:
    if arguments.get("labels") is None:
        return False
    keep = arguments.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        return False
    return model.training if skip_logits is None else skip_logits


def _return_dict(model, extra: dict) -> bool:
    """What ``can_return_tuple`` decides: the call's ``return_dict``, else the config's."""
    passed = extra.pop("return_dict", None)
    return bool(model.config.return_dict if passed is None else passed)


def _output(family: _Family, backbone_out, loss) -> object:
    fields = {}
    for name in family.output.__dataclass_fields__:
        if name == "loss":
            fields[name] = loss
        elif name != "logits":
            fields[name] = getattr(backbone_out, name, None)
    return family.output(**fields)


def _make_forward(family: _Family, class_forward: Callable, skip_logits: Optional[bool]):
    signature = inspect.signature(class_forward)
    var_kw = next((p.name for p in signature.parameters.values()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(class_forward)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        fused = _wants_fused(self, skip_logits, arguments)
        if not fused and not (family.masked and arguments.get("labels") is not None):
            return class_forward(self, *args, **kwargs)  # loss via the patched loss_function
        arguments.pop(next(iter(signature.parameters)))  # self
        extra = dict(arguments.pop(var_kw, None) or {})
        return_dict = _return_dict(self, extra)
        labels = arguments.pop("labels")
        if not fused:  # BERT keeping its logits: its own forward, fastlab's loss
            out = class_forward(self, **arguments, **extra, return_dict=True)
            loss = cross_entropy(out.logits.reshape(-1, self.config.vocab_size),
                                 labels.reshape(-1).to(out.logits.device))
            out = dataclasses.replace(out, loss=loss)  # a ModelOutput keeps its keys in order
            return out if return_dict else out.to_tuple()
        arguments.pop("logits_to_keep", None)
        backbone = getattr(self, family.backbone)
        if family.masked:
            out = backbone(**arguments, **extra, return_dict=True)
            head = self.cls.predictions
            hidden = head.transform(out.last_hidden_state)
            loss = fused_linear_cross_entropy(hidden, head.decoder.weight,
                                              labels.to(hidden.device), head.decoder.bias)
        else:
            out = backbone(**arguments, **extra)
            loss = _fused_causal_loss(out.last_hidden_state, self.lm_head, labels, extra)
        result = _output(family, out, loss)
        return result if return_dict else result.to_tuple()

    return forward


def _loss_function_name(model) -> str:
    """Name of the loss_function the model would use, read without calling its getter (which
    warns about an unset loss_type)."""
    fn = model.__dict__.get("_loss_function")
    if fn is None:
        loss_type = getattr(model, "loss_type", None)
        fn = LOSS_MAPPING.get(loss_type, LOSS_MAPPING["ForCausalLM"])
    return getattr(fn, "__name__", repr(fn))


def _patch_loss(model, family: _Family, skip_logits: Optional[bool],
                restore: List[Callable[[], None]]) -> List[Change]:
    cls = type(model)
    changes = []
    forward = _make_forward(family, cls.forward, skip_logits)
    model.forward = types.MethodType(forward, model)
    restore.append(lambda: model.__dict__.pop("forward", None))
    fused = "fused linear cross-entropy, logits None, for calls with labels"
    kept = "cross-entropy on the logits"
    after = {None: f"{fused} in training mode; {kept} otherwise",
             True: f"{fused}", False: f"{kept} (logits kept)"}[skip_logits]
    changes.append(Change("forward", f"{cls.__name__}.forward", f"fastlab {after}"))
    if not family.masked:
        had = "_loss_function" in model.__dict__
        previous = model.__dict__.get("_loss_function")
        before = _loss_function_name(model)
        model.loss_function = causal_lm_loss

        def put_back():
            if had:
                model._loss_function = previous
            else:
                model.__dict__.pop("_loss_function", None)

        restore.append(put_back)
        changes.append(Change("loss_function", before,
                              "fastlab causal_lm_loss (calls that keep the logits)"))
    return changes


# ------------------------------------------------------------------------------ public API
@dataclasses.dataclass
class _PatchState:
    family: str
    changes: List[Change]
    restore: List[Callable[[], None]]


def patch(model, *, loss: bool = True, attention: bool = True, rms_norm: bool = True,
          mlp: bool = True, rope: bool = True,
          skip_logits: Optional[bool] = None) -> List[Change]:
    """Put fastlab's fused linear cross-entropy, attention and (Llama-style models) RMSNorm,
    SwiGLU and RoPE into ``model`` (in place).

    Args:
        model: a Llama-style causal LM, ``GPT2LMHeadModel`` or ``BertForMaskedLM``
            (subclasses too).
        loss: replace the loss (see the module docstring).
        attention: switch the attention implementation to ``"fastlab"``.
        rms_norm: Llama-style models: every RMSNorm module's forward on
            :func:`fastlab.ops.rms_norm`.
        mlp: Llama-style models: every gated MLP whose ``act_fn`` is SiLU computes its
            gating with :func:`fastlab.ops.swiglu` (others are kept and reported).
        rope: Llama-style models: the attention modules apply RoPE with
            :func:`fastlab.ops.apply_rotary`.
        skip_logits: which calls with labels skip the logits: None (default) in training
            mode, True always, False never.

    Returns:
        The list of :class:`Change` made, in order (parts that were skipped say so).
        :func:`unpatch` undoes them.

    Raises:
        TypeError: the model is of no supported family.
        RuntimeError: the model is already patched, or has a ``forward`` set on the instance.
        ValueError: the config asks for what fastlab's attention cannot express (a sliding
            window); nothing is changed then.
    """
    family = _family_of(model)
    if family is None:
        supported = ", ".join(c for f in _FAMILIES for c in f.classes)
        raise TypeError(f"fastlab.integrations.patch supports {supported} (and subclasses), "
                        f"got {type(model).__name__}")
    return _patch(model, family, loss, attention, skip_logits,
                  dict(rms_norm=rms_norm, mlp=mlp, rope=rope))


_LAYER_PARTS = (("rms_norm", _patch_rms_norm), ("mlp", _patch_mlp), ("rope", _patch_rope))


def _patch(model, family, loss, attention, skip_logits, layers: Dict[str, bool]) -> List[Change]:
    if skip_logits not in (None, True, False):
        raise ValueError(f"skip_logits must be None, True or False, got {skip_logits!r}")
    if getattr(model, _STATE, None) is not None:
        raise RuntimeError("model is already patched by fastlab; call "
                           "fastlab.integrations.unpatch(model) first")
    if loss and "forward" in model.__dict__:
        raise RuntimeError("model has a forward set on the instance (a hook or another patch): "
                           "fastlab patches only the class's forward; remove it first")
    if attention:
        _check_attention_config(model)
    restore: List[Callable[[], None]] = []
    changes: List[Change] = []
    try:
        if loss:
            changes += _patch_loss(model, family, skip_logits, restore)
        if attention:
            changes += _patch_attention(model, restore)
        if family.llama_layers:
            for name, patch_part in _LAYER_PARTS:
                if layers[name]:
                    changes += patch_part(model, restore)
    except BaseException:
        for undo in reversed(restore):
            undo()
        raise
    setattr(model, _STATE, _PatchState(family.name, list(changes), restore))
    return changes


def unpatch(model) -> List[Change]:
    """Undo :func:`patch` on ``model``; returns the changes it undid. The global
    registrations of ``"fastlab"`` in transformers stay (they change no model)."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise RuntimeError("model is not patched by fastlab")
    for undo in reversed(state.restore):
        undo()
    delattr(model, _STATE)
    return state.changes


def is_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


def _family_patcher(name: str):
    family = next(f for f in _FAMILIES if f.name == name)

    def patch_family(model, *, loss: bool = True, attention: bool = True,
                     rms_norm: bool = True, mlp: bool = True, rope: bool = True,
                     skip_logits: Optional[bool] = None) -> List[Change]:
        if _family_of(model) is not family:
            raise TypeError(f"patch_{name} expects a {' or '.join(family.classes)}, got "
                            f"{type(model).__name__}")
        return _patch(model, family, loss, attention, skip_logits,
                      dict(rms_norm=rms_norm, mlp=mlp, rope=rope))

    patch_family.__name__ = patch_family.__qualname__ = f"patch_{name}"
    patch_family.__doc__ = (f":func:`patch` for {' / '.join(family.classes)} only "
                            f"(a TypeError for any other model).")
    return patch_family


patch_llama = _family_patcher("llama")
patch_gpt2 = _family_patcher("gpt2")
patch_bert = _family_patcher("bert")

TRANSFORMERS_VERSION = transformers.__version__
