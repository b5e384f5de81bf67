"""AdamW step on GPT-2 small's parameters (124.4M, 148 tensors, nanoGPT's two groups).

Cases (op ``adamw``, mode ``step``, one optimizer step on gradients already in memory):
- ``gpt2s_fp32``: fp32 params. Floor 28 bytes/param: read grad, param, exp_avg,
  exp_avg_sq; write param, exp_avg, exp_avg_sq (7 fp32 accesses).
- ``gpt2s_fp32_clip``: the same plus clipping to a global norm of 1.0 (fastlab fused;
  torch: clip_grad_norm_(foreach) then the fused step). Floor 32 bytes/param: one more
  read of the gradient for the norm.
- ``gpt2s_bf16_master``: bf16 params. fastlab keeps fp32 master weights and fp32 moments;
  torch fused updates the bf16 params and bf16 moments directly (no master copy, so small
  updates are lost). Floor 28 bytes/param for the master-weight update: read grad (2),
  master, exp_avg, exp_avg_sq (12); write them (12) and the bf16 param (2).
Before timing, every provider's first step is checked against ``adamw_ref``.
"""
import pytest
import torch

from benches.conftest import optional_import
from fastlab.optim.adamw import AdamW, adamw_ref, grad_norm_ref
from fastlab.testing import assert_close, make_generator

N_LAYER, N_EMBD, VOCAB, BLOCK_SIZE = 12, 768, 50257, 1024
HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1
MAX_NORM = 1.0


def gpt2_small_shapes():
    """Parameter shapes of GPT-2 small (weights tied: wte is also the output layer)."""
    shapes = [(VOCAB, N_EMBD), (BLOCK_SIZE, N_EMBD)]
    for _ in range(N_LAYER):
        shapes += [(N_EMBD,), (N_EMBD,),                       # ln_1 weight, bias
                   (3 * N_EMBD, N_EMBD), (3 * N_EMBD,),        # attn.c_attn
                   (N_EMBD, N_EMBD), (N_EMBD,),                # attn.c_proj
                   (N_EMBD,), (N_EMBD,),                       # ln_2 weight, bias
                   (4 * N_EMBD, N_EMBD), (4 * N_EMBD,),        # mlp.c_fc
                   (N_EMBD, 4 * N_EMBD), (N_EMBD,)]            # mlp.c_proj
    return shapes + [(N_EMBD,), (N_EMBD,)]                     # ln_f


SHAPES = gpt2_small_shapes()
N_PARAMS = sum(torch.Size(s).numel() for s in SHAPES)
SHAPE_INFO = {"params": N_PARAMS, "tensors": len(SHAPES)}


def _model(dtype):
    """Params and gradients (fixed seeds, so every provider starts from the same values)."""
    g = make_generator(0, "cuda")
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter((0.02 * torch.randn(shape, device="cuda", generator=g)).to(dtype))
        p.grad = (1e-3 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
        params.append(p)
    return params


def _groups(params):
    """nanoGPT's grouping: weight decay on matrices only."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _group_indices():
    """The same grouping as lists of indices into SHAPES, with each group's decay."""
    decayed = [i for i, s in enumerate(SHAPES) if len(s) >= 2]
    plain = [i for i, s in enumerate(SHAPES) if len(s) < 2]
    return [(decayed, WEIGHT_DECAY), (plain, 0.0)]


def _expected(dtype, clip):
    """Params after one step of the plain-PyTorch reference, in fp32."""
    params = _model(dtype)
    weights = [p.detach().float() for p in params]
    grads = [p.grad.float() for p in params]
    clip_coef = None
    if clip:
        norm = grad_norm_ref(grads, None)
        clip_coef = (MAX_NORM / (norm + 1e-6)).clamp(max=1.0)
    for idx, weight_decay in _group_indices():
        adamw_ref([weights[i] for i in idx], [grads[i] for i in idx],
                  [torch.zeros_like(weights[i]) for i in idx],
                  [torch.zeros_like(weights[i]) for i in idx], [None] * len(idx),
                  [None] * len(idx), [torch.ones((), device="cuda") for _ in idx],
                  lr=HYPER["lr"], beta1=HYPER["betas"][0], beta2=HYPER["betas"][1],
                  eps=HYPER["eps"], weight_decay=weight_decay, amsgrad=False,
                  maximize=False, clip_coef=clip_coef)
    return weights


def _check_first_step(step, params, expected, dtype, what):
    step()
    for p, e in zip(params, expected):
        assert_close(p.detach().float(), e, dtype=dtype, msg=what)


def _optimizer(provider, params):
    if provider == "fastlab":
        return AdamW(_groups(params), **HYPER)
    if provider == "torch_fused":
        return torch.optim.AdamW(_groups(params), fused=True, **HYPER)
    if provider == "torch_foreach":
        return torch.optim.AdamW(_groups(params), foreach=True, **HYPER)
    apex = optional_import("apex.optimizers")
    return apex.FusedAdam(_groups(params), adam_w_mode=True, **HYPER)


@pytest.mark.parametrize("provider", ["fastlab", "torch_fused", "torch_foreach", "apex"])
def test_adamw_gpt2s_fp32(bench, provider):
    params = _model(torch.float32)
    opt = _optimizer(provider, params)
    _check_first_step(opt.step, params, _expected(torch.float32, False), torch.float32,
                      provider)
    bench.measure("adamw", "gpt2s_fp32", "step", provider, opt.step,
                  floor_bytes=28 * N_PARAMS, shape=SHAPE_INFO)


@pytest.mark.parametrize("provider", ["fastlab", "torch_fused"])
def test_adamw_gpt2s_fp32_clip(bench, provider):
    params = _model(torch.float32)
    if provider == "fastlab":
        opt = AdamW(_groups(params), max_grad_norm=MAX_NORM, **HYPER)
        step = opt.step
    else:
        opt = torch.optim.AdamW(_groups(params), fused=True, **HYPER)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()

    _check_first_step(step, params, _expected(torch.float32, True), torch.float32, provider)
    if provider == "fastlab":
        reference = grad_norm_ref([p.grad for p in _model(torch.float32)], None)
        assert_close(opt.last_grad_norm, reference, dtype=torch.float32, scale=10.0)
    # clip_grad_norm_ rescales torch's gradients in place: give both the original ones back
    for p, fresh in zip(params, _model(torch.float32)):
        p.grad = fresh.grad
    bench.measure("adamw", "gpt2s_fp32_clip", "step", provider, step,
                  floor_bytes=32 * N_PARAMS, shape=SHAPE_INFO)


@pytest.mark.parametrize("provider", ["fastlab", "torch_fused"])
def test_adamw_gpt2s_bf16_master(bench, provider):
    params = _model(torch.bfloat16)
    if provider == "fastlab":
        opt = AdamW(_groups(params), master_weights=True, **HYPER)
    else:
        opt = torch.optim.AdamW(_groups(params), fused=True, **HYPER)
    expected = _expected(torch.bfloat16, False)
    _check_first_step(opt.step, params, expected, torch.bfloat16, provider)
    if provider == "fastlab":
        for m, e in zip((opt.state[p]["master_param"] for p in params), expected):
            assert_close(m, e, dtype=torch.float32, msg="master weights")
    bench.measure("adamw", "gpt2s_bf16_master", "step", provider, opt.step,
                  floor_bytes=28 * N_PARAMS, shape=SHAPE_INFO)
