"""fastlab.optim.AdamW against torch.optim.AdamW, step by step.

CPU runs exercise both the Triton kernels (under TRITON_INTERPRET=1, forced with
``backend("kernel")``) and the plain-PyTorch reference that CPU tensors use by default.
"""
import copy

import pytest
import torch

import fastlab.kernels.adamw as K
from fastlab.ops._dispatch import backend
from fastlab.optim.adamw import AdamW
from fastlab.testing import non_contiguous, randn

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
#: Shapes that are neither powers of two nor multiples of the kernels' block sizes; the
#: last has full blocks and a tail (K.BLOCK = 1024 elements).
SHAPES = [(37,), (3, 53), (7, 1, 129), (1,), (129, 3), (5, 7, 11), (3, 1100)]
#: Two chunks (K.CHUNK = 16384 elements) of one tensor: two programs share its step.
MULTI_CHUNK = (131, 129)
#: fp32 agreement with torch after 20 steps: 1e-6 relative; the absolute part covers values
#: that pass near zero, whose error is a few ulps of the O(1) values they came from.
RTOL, ATOL = 1e-6, 1e-6


def _params(shapes, dtype=torch.float32, device=DEVICE, seed=0):
    return [torch.nn.Parameter(randn(s, dtype, device, seed=seed + i))
            for i, s in enumerate(shapes)]


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(param_lists, seed, scale=1.0):
    """The same fresh random gradient on the matching parameter of every list."""
    for i, group in enumerate(zip(*param_lists)):
        g = randn(group[0].shape, torch.float32, group[0].device, seed=seed * 1000 + i,
                  scale=scale)
        for p in group:
            p.grad = g.to(p.dtype).clone()


def _groups(params, **second):
    """Two param groups, the second with its own hyperparameters."""
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], **second}]


def _assert_params_close(actual, expected, rtol=RTOL, atol=ATOL):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"param {i}: {m}")


def _assert_state_close(ours, theirs, params_ours, params_theirs):
    for p, q in zip(params_ours, params_theirs):
        mine, ref = ours.state[p], theirs.state[q]
        assert set(ref) <= set(mine)
        for key in ref:
            torch.testing.assert_close(mine[key].cpu().float(), ref[key].cpu().float(),
                                       rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


def _run(pairs, steps, seed=0, which="kernel", before_step=None):
    """Step every (optimizer, params) pair ``steps`` times on identical gradients."""
    for s in range(steps):
        _set_grads([params for _, params in pairs], seed=seed + s)
        for opt, params in pairs:
            if before_step is not None:
                before_step(opt, params)
            if isinstance(opt, AdamW):
                with backend(which):
                    opt.step()
            else:
                opt.step()


def _check_once(*, weight_decay, amsgrad, maximize, which, steps=20, shapes=SHAPES):
    ours_p = _params(shapes)
    ref_p = _clone(ours_p)
    kwargs = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
                  amsgrad=amsgrad, maximize=maximize)
    second = dict(lr=1e-2, weight_decay=2 * weight_decay)
    ours = AdamW(_groups(ours_p, **second), **kwargs)
    ref = torch.optim.AdamW(_groups(ref_p, **second), **kwargs)
    _run([(ours, ours_p), (ref, ref_p)], steps, which=which)
    _assert_params_close(ours_p, ref_p)
    _assert_state_close(ours, ref, ours_p, ref_p)


@pytest.mark.parametrize("which", ["kernel", "reference"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_for_20_steps(weight_decay, amsgrad, maximize, which):
    _check_once(weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, which=which,
                shapes=SHAPES + [MULTI_CHUNK])


def test_float64_params_fall_back_to_the_reference():
    ours_p = _params(SHAPES[:3], dtype=torch.float64)
    ref_p = _clone(ours_p)
    ours, ref = AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    _run([(ours, ours_p), (ref, ref_p)], steps=5, which="kernel")
    _assert_params_close(ours_p, ref_p, rtol=1e-12, atol=1e-12)


def test_cpu_tensors_use_the_reference_by_default():
    ours_p = _params(SHAPES[:3])
    ref_p = _clone(ours_p)
    ours, ref = AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    _run([(ours, ours_p), (ref, ref_p)], steps=5, which="auto")
    _assert_params_close(ours_p, ref_p)


@pytest.mark.parametrize("which", ["kernel", "reference"])
def test_non_contiguous_params_and_grads(which):
    """A transposed (dense) param, a strided (non-dense) param, a grad laid out unlike
    its param: each must update exactly like the contiguous case."""
    base = _params([(7, 13), (5, 9), (11, 6)])
    ours_p = [torch.nn.Parameter(base[0].detach().t().contiguous().t()),  # dense, transposed
              torch.nn.Parameter(non_contiguous(base[1].detach())),  # every other column
              torch.nn.Parameter(base[2].detach().clone())]
    assert not ours_p[0].is_contiguous() and not ours_p[1].is_contiguous()
    ref_p = _clone(base)

    def strided_grad(opt, params):
        if isinstance(opt, AdamW):
            # param 0's grad laid out like param 0 (flat path), param 2's strided (staged)
            params[0].grad = params[0].grad.t().contiguous().t()
            params[2].grad = non_contiguous(params[2].grad)

    ours = AdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1)
    _run([(ours, ours_p), (ref, ref_p)], steps=8, which=which, before_step=strided_grad)
    assert not ours_p[1].is_contiguous()
    _assert_params_close(ours_p, ref_p)


@pytest.mark.parametrize("which", ["kernel", "reference"])
def test_tensor_lr_changed_in_place(which):
    lr = torch.tensor(1e-2, device=DEVICE)
    ours_p = _params(SHAPES[:3])
    ref_p = _clone(ours_p)
    ours, ref = AdamW(ours_p, lr=lr), torch.optim.AdamW(ref_p, lr=1e-2)
    for step, value in enumerate([1e-2, 5e-3, 2e-2]):
        lr.fill_(value)
        ref.param_groups[0]["lr"] = value
        _run([(ours, ours_p), (ref, ref_p)], steps=2, seed=10 * step, which=which)
    _assert_params_close(ours_p, ref_p)


def test_float_lr_changed_between_steps():
    ours_p = _params(SHAPES[:3])
    ref_p = _clone(ours_p)
    ours, ref = AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    for step, value in enumerate([1e-2, 3e-3, 3e-2]):
        ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = value
        _run([(ours, ours_p), (ref, ref_p)], steps=2, seed=10 * step)
    _assert_params_close(ours_p, ref_p)


def test_one_launch_per_group_and_cached_tables(monkeypatch):
    """40 tensors in two groups: two update launches and one finalize per step; the tables
    are built once, and new gradient memory only re-uploads the addresses."""
    calls = {"update": 0, "finalize": 0, "sumsq": 0, "plan": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(K, "adamw_update", counting("update", K.adamw_update))
    monkeypatch.setattr(K, "finalize", counting("finalize", K.finalize))
    monkeypatch.setattr(K, "grad_sumsq", counting("sumsq", K.grad_sumsq))
    monkeypatch.setattr(AdamW, "_build_plan", counting("plan", AdamW._build_plan))
    params = _params([(3 + i % 5, 2 + i % 3) for i in range(40)])
    ref_p = _clone(params)
    opt = AdamW(_groups(params, lr=1e-2), lr=1e-3, max_grad_norm=1.0)
    ref = AdamW(_groups(ref_p, lr=1e-2), lr=1e-3, max_grad_norm=1.0)
    for step in range(3):
        _set_grads([params, ref_p], seed=step)  # fresh gradient tensors: new addresses
        for _ in range(2 if step == 1 else 1):  # a second step on the same gradients
            with backend("kernel"):
                opt.step()
            with backend("reference"):
                ref.step()
    assert calls == {"update": 8, "finalize": 4, "sumsq": 8, "plan": 1}
    _assert_params_close(params, ref_p)


@pytest.mark.parametrize("which", ["kernel", "reference"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clipping_equals_clip_grad_norm_then_step(max_norm, which):
    ours_p = _params(SHAPES + [MULTI_CHUNK])
    ref_p = _clone(ours_p)
    ours = AdamW(_groups(ours_p, weight_decay=0.0), lr=1e-2, max_grad_norm=max_norm)
    ref = torch.optim.AdamW(_groups(ref_p, weight_decay=0.0), lr=1e-2)
    norms = []

    def clip(opt, params):
        if not isinstance(opt, AdamW):
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))

    for step in range(10):
        _run([(ours, ours_p), (ref, ref_p)], steps=1, seed=step, which=which, before_step=clip)
        torch.testing.assert_close(ours.last_grad_norm.cpu(), norms[-1].cpu(), rtol=1e-6,
                                   atol=0.0)
        assert ours.last_step_skipped.item() == 0.0
    _assert_params_close(ours_p, ref_p)
    _assert_state_close(ours, ref, ours_p, ref_p)


@pytest.mark.parametrize("which", ["kernel", "reference"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_grad_norm_skips_the_whole_step(bad, which):
    params = _params(SHAPES)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True, max_grad_norm=1.0)
    _run([(opt, params)], steps=2, which=which)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    _set_grads([params], seed=99)
    params[-1].grad.view(-1)[-1] = bad
    with backend(which):
        opt.step()
    assert opt.last_step_skipped.item() == 1.0
    assert not torch.isfinite(opt.last_grad_norm).item()
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after_state = opt.state_dict()["state"]
    for i, saved in before_state.items():
        for key, value in saved.items():
            assert torch.equal(after_state[i][key], value), (i, key)
    # the next finite step goes on from step 2, as if the bad one never happened
    _run([(opt, params)], steps=1, seed=5, which=which)
    assert all(opt.state[p]["step"].item() == 3.0 for p in params)


def _scaled_backward(scaler, params, seed):
    """A loss whose gradient is known: sum(w * p) with fresh random w."""
    loss = sum((randn(p.shape, torch.float32, p.device, seed=seed * 1000 + i) * p).sum()
               for i, p in enumerate(params))
    scaler.scale(loss).backward()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_step(unscale_first):
    """torch.amp.GradScaler drives the fused step: unscale inside the kernel, or no second
    unscale after the user's scaler.unscale_ (followed by clip_grad_norm_)."""
    ours_p = _params(SHAPES)
    ref_p = _clone(ours_p)
    ours, ref = AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0**10) for _ in range(2)]
    for step in range(6):
        for opt, params, scaler in ((ours, ours_p, scalers[0]), (ref, ref_p, scalers[1])):
            opt.zero_grad()
            _scaled_backward(scaler, params, seed=step)
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            with backend("kernel"):
                scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    _assert_params_close(ours_p, ref_p)


def test_grad_scaler_inf_skips_step_and_backs_off():
    params = _params(SHAPES)
    opt = AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    _scaled_backward(scaler, params, seed=0)
    with backend("kernel"):
        scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    opt.zero_grad()
    _scaled_backward(scaler, params, seed=1)
    params[0].grad.view(-1)[0] = float("inf")
    with backend("kernel"):
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert opt.last_step_skipped.item() == 1.0
    for p, b, s in zip(params, before, steps):
        assert torch.equal(p.detach(), b) and torch.equal(opt.state[p]["step"], s)


@pytest.mark.parametrize("direction", ["torch_to_fastlab", "fastlab_to_torch"])
def test_state_dict_round_trip(direction):
    """10 steps in one optimizer, the checkpoint loaded into the other, 10 more steps:
    equal to 20 steps of torch alone."""
    kwargs = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ref_p = _params(SHAPES)
    first_p, second_p = _clone(ref_p), None
    ref = torch.optim.AdamW(ref_p, **kwargs)
    _run([(ref, ref_p)], steps=20)
    first_cls, second_cls = ((torch.optim.AdamW, AdamW) if direction == "torch_to_fastlab"
                             else (AdamW, torch.optim.AdamW))
    first = first_cls(first_p, **kwargs)
    _run([(first, first_p)], steps=10)
    saved = copy.deepcopy(first.state_dict())
    second_p = _clone(first_p)
    second = second_cls(second_p, **kwargs)
    second.load_state_dict(saved)
    for p in second_p:
        assert set(second.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert second.state[p]["exp_avg"].shape == p.shape
    _run([(second, second_p)], steps=10, seed=10)
    _assert_params_close(second_p, ref_p)
    _assert_state_close(second, ref, second_p, ref_p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_follow_an_fp32_reference(dtype):
    """bf16/fp16 params with fp32 masters: the masters follow torch.optim.AdamW run in fp32
    on the same (low-precision) gradients, and each param is its master rounded."""
    ours_p = _params(SHAPES, dtype=dtype)
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in ours_p]
    kwargs = dict(lr=1e-3, weight_decay=0.1)
    ours = AdamW(ours_p, master_weights=True, **kwargs)
    ref = torch.optim.AdamW(ref_p, **kwargs)

    def same_grads(opt, params):
        if not isinstance(opt, AdamW):
            for p, q in zip(params, ours_p):
                p.grad = q.grad.float()

    _run([(ours, ours_p), (ref, ref_p)], steps=20, before_step=same_grads)
    masters = [ours.state[p]["master_param"] for p in ours_p]
    _assert_params_close(masters, ref_p)
    for p, m in zip(ours_p, masters):
        assert m.dtype == torch.float32 and ours.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p.detach(), m.to(dtype))
    # the updates are below the low-precision resolution: without masters they are lost
    plain_p = _params(SHAPES, dtype=dtype)
    plain = torch.optim.AdamW(plain_p, **kwargs)
    _run([(plain, plain_p)], steps=20)
    lost = max((p.detach().float() - r).abs().max().item() for p, r in zip(plain_p, ref_p))
    kept = max((p.detach().float() - r).abs().max().item() for p, r in zip(ours_p, ref_p))
    assert kept < lost


def test_master_weights_state_dict_resume_is_exact():
    kwargs = dict(lr=1e-3, weight_decay=0.1, master_weights=True)
    straight_p = _params(SHAPES, dtype=torch.bfloat16)
    straight = AdamW(straight_p, **kwargs)
    _run([(straight, straight_p)], steps=6)
    first_p = _params(SHAPES, dtype=torch.bfloat16)
    first = AdamW(first_p, **kwargs)
    _run([(first, first_p)], steps=3)
    saved = copy.deepcopy(first.state_dict())
    assert saved["state"][0]["master_param"].dtype == torch.float32
    resumed_p = _clone(first_p)
    resumed = AdamW(resumed_p, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_p[0]]["exp_avg"].dtype == torch.float32
    _run([(resumed, resumed_p)], steps=3, seed=3)
    for a, b in zip(resumed_p, straight_p):
        assert torch.equal(a.detach(), b.detach())
    # and torch's AdamW takes the same checkpoint (moments cast to the param dtype)
    theirs = torch.optim.AdamW(_clone(first_p), lr=1e-3)
    theirs.load_state_dict(saved)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1e-3), ValueError, "lr must be >= 0"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "one floating-point value"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair of floats"),
    (dict(eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a float >= 0"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be None or a float > 0"),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdamW(_params([(3,)]), **kwargs)


def test_bad_param_group():
    opt = AdamW(_params([(3,)]))
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        opt.add_param_group({"params": _params([(4,)]), "betas": (0.9, 1.0)})


def test_complex_params_are_rejected():
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize("which", ["kernel", "reference"])
def test_bad_gradients(which):
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdamW([p])
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        with backend(which):
            opt.step()


def test_clipping_across_devices_is_rejected(monkeypatch):
    params = _params([(3,), (4,)])
    opt = AdamW(params, max_grad_norm=1.0)
    _set_grads([params], seed=0)
    fake = {torch.device("cpu"): [], torch.device("meta"): []}
    monkeypatch.setattr(AdamW, "_params_with_grads", lambda self: fake)
    with pytest.raises(ValueError, match="max_grad_norm needs every parameter on one device"):
        opt.step()


# ------------------------------------------------------------------------------ GPU checks
def _gpt_like_shapes():
    return [(2048, 768), (768,), (768, 2304), (2304,), (3072, 768), (1000, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("amsgrad", [False, True])
def test_gpu_matches_torch_fused(amsgrad):
    ours_p = _params(_gpt_like_shapes(), device="cuda")
    ref_p = _clone(ours_p)
    kwargs = dict(lr=1e-3, weight_decay=0.1, amsgrad=amsgrad)
    ours = AdamW(_groups(ours_p, weight_decay=0.0), **kwargs)
    ref = torch.optim.AdamW(_groups(ref_p, weight_decay=0.0), fused=True, **kwargs)
    _run([(ours, ours_p), (ref, ref_p)], steps=20)
    _assert_params_close(ours_p, ref_p, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_step_never_syncs_with_the_host():
    """Clipping, a grad scaler's tensors, and a resume from a CPU checkpoint: no step
    waits for the GPU."""
    params = _params(_gpt_like_shapes(), device="cuda")
    opt = AdamW(params, lr=1e-3, max_grad_norm=1.0)
    _run([(opt, params)], steps=1)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        for key, value in state.items():
            state[key] = value.cpu()
    opt = AdamW(params, lr=1e-3, max_grad_norm=1.0)
    opt.load_state_dict(saved)
    opt.grad_scale = torch.full((1,), 4.0, device="cuda")
    opt.found_inf = torch.zeros(1, device="cuda")
    _set_grads([params], seed=1)
    with backend("kernel"):
        opt.step()  # builds the tables (one upload)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            with backend("kernel"):
                opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_step_in_a_cuda_graph():
    """Captured with a device lr: replays equal eager steps, and an in-place lr change
    reaches the replay."""
    shapes = _gpt_like_shapes()
    eager_p, graph_p = _params(shapes, device="cuda"), _params(shapes, device="cuda")
    lr = torch.tensor(1e-3, device="cuda")
    eager = AdamW(eager_p, lr=1e-3, max_grad_norm=1.0)
    graphed = AdamW(graph_p, lr=lr, max_grad_norm=1.0)
    _set_grads([eager_p, graph_p], seed=0)
    eager.step()
    static_grads = [p.grad for p in graph_p]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step()  # warm-up: state, tables and compilation outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step, value in enumerate([1e-3, 5e-4]):
        lr.fill_(value)
        eager.param_groups[0]["lr"] = value
        _set_grads([eager_p], seed=step + 1)
        for g, p in zip(static_grads, eager_p):
            g.copy_(p.grad)  # the graph reads the gradient buffers it was captured with
        eager.step()
        graph.replay()
    _assert_params_close(graph_p, eager_p)


@pytest.mark.gpu
def test_gpu_gradients_allocated_by_the_capture():
    """The whole-step recipe: gradients freed before the capture, written by the captured
    backward into the graph's pool; finish_capture() points the tables at them, and the
    replays then equal eager steps on the same data. Without finish_capture the tables
    would still name the warm-up step's freed gradients."""
    torch.manual_seed(0)
    x_all = torch.randn(3, 64, 48, device="cuda")
    ours = [torch.nn.Parameter(randn(s, torch.float32, "cuda", seed=i))
            for i, s in enumerate([(48, 40), (40,), (40, 7), (7,)])]
    ref = _clone(ours)

    def loss_of(params, x):
        w1, b1, w2, b2 = params
        return (torch.tanh(x @ w1 + b1) @ w2 + b2).square().mean()

    graphed = AdamW(ours, lr=1e-2, max_grad_norm=0.5)
    eager = AdamW(ref, lr=1e-2, max_grad_norm=0.5)
    static_x = x_all[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state and tables built for eager gradients
        loss_of(ours, static_x).backward()
        graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    loss_of(ref, static_x).backward()
    eager.step()
    warm_grads = [p.grad.data_ptr() for p in ours]
    graphed.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_of(ours, static_x).backward()
        graphed.step()
    graphed.finish_capture()
    assert [p.grad.data_ptr() for p in ours] != warm_grads  # the graph's own gradients
    for step in (1, 2):
        static_x.copy_(x_all[step])
        graph.replay()
        eager.zero_grad(set_to_none=True)
        loss_of(ref, x_all[step]).backward()
        eager.step()
    _assert_params_close(ours, ref, rtol=1e-5)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=ATOL)


@pytest.mark.gpu
def test_gpu_master_weights_bf16():
    ours_p = _params(_gpt_like_shapes(), dtype=torch.bfloat16, device="cuda")
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in ours_p]
    ours = AdamW(ours_p, lr=1e-4, weight_decay=0.1, master_weights=True)
    ref = torch.optim.AdamW(ref_p, lr=1e-4, weight_decay=0.1, fused=True)

    def same_grads(opt, params):
        if not isinstance(opt, AdamW):
            for p, q in zip(params, ours_p):
                p.grad = q.grad.float()

    _run([(ours, ours_p), (ref, ref_p)], steps=20, before_step=same_grads)
    _assert_params_close([ours.state[p]["master_param"] for p in ours_p], ref_p,
                         rtol=1e-5, atol=1e-5)
