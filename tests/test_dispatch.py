"""The one way ops are wired (fastlab.ops._dispatch): the torch.library op, its fake, its
autograd, the eager path without the dispatcher, and what torch.compile sees of the ops."""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastlab.models.gpt import GPT, GPTConfig
from fastlab.ops import backend
from fastlab.ops._dispatch import define_op, triton_op_supported
from fastlab.testing import randn

# the modules (the package exports the functions of the same names)
ce = importlib.import_module("fastlab.ops.cross_entropy")
flce = importlib.import_module("fastlab.ops.fused_linear_cross_entropy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ the helper

def _twice_fake(x: torch.Tensor, factor: float) -> torch.Tensor:
    return torch.empty_like(x)


def _twice_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _twice_backward(ctx, grad):
    return 2.0 * ctx.factor * grad, None


@define_op("fastlab_test::twice", fake=_twice_fake, backward=_twice_backward,
           setup_context=_twice_setup)
def _twice(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * (2.0 * factor)


def _refuse(*args, **kwargs):
    raise AssertionError("the call went through the torch.library dispatcher")


def test_eager_calls_on_plain_tensors_skip_the_dispatcher(monkeypatch):
    x = torch.randn(3, 4, requires_grad=True)
    want = torch.ops.fastlab_test.twice(x, 1.5)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    monkeypatch.setattr(_twice, "op", _refuse)
    got = _twice(x, 1.5)
    assert type(got.grad_fn).__name__ == "twiceBackward"  # the helper's own Function
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gwant)
    with torch.no_grad():
        assert _twice(x, 1.5).grad_fn is None


def test_traced_calls_go_through_the_registered_op(monkeypatch):
    """Under torch.compile and on tensor subclasses the op, not the body, is called."""
    calls = []
    op = _twice.op
    monkeypatch.setattr(_twice, "op", lambda *a: calls.append(1) or op(*a))
    x = torch.randn(5, requires_grad=True)
    graphs = []
    compiled = torch.compile(lambda v: _twice(v, 0.5).sum(), backend=_recorder(graphs),
                             fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(g, torch.ones(5))
    assert calls and "fastlab_test.twice.default" in _targets(graphs[0])
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(2, 7, dtype=torch.float64))
        assert _twice(fake, 2.0).shape == (2, 7)
    torch.library.opcheck(torch.ops.fastlab_test.twice.default, (x, 3.0))


def test_mutating_ops_take_no_backward():
    with pytest.raises(ValueError, match="functional ops only"):
        define_op("fastlab_test::bad", fake=lambda x: None, mutates_args=("x",),
                  backward=_twice_backward, setup_context=_twice_setup)(lambda x: None)


def test_kind_follows_the_interpreter():
    """Interpreted kernels cannot be traced: there the Triton ops are custom ops."""
    want = "triton" if triton_op_supported() else "custom"
    for op in (ce._forward, ce._backward, ce._scale_grad, flce._forward, flce._backward):
        assert op.kind == want, op.name
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert want == "custom"


# ------------------------------------------------------------------------------ fakes

@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fakes_match_the_bodies(reduction):
    x = randn((6, 11), torch.bfloat16, "cpu", seed=1)
    t = torch.tensor([0, 3, -100, 10, 2, 5])
    hidden = randn((6, 8), torch.float32, "cpu", seed=2)
    weight = randn((11, 8), torch.float32, "cpu", seed=3)
    options = (-100, 0.1, 1e-3, reduction, False)
    calls = [
        (ce._forward, (x, t, None, *options)),
        (ce._forward, (x, t, torch.empty_like(x), *options)),
        (flce._forward, (hidden, weight, None, t, *options, True, 4, torch.float32, False)),
        (flce._forward, (hidden, weight, weight[:, 0].clone(), t, *options, False, 0,
                         torch.float32, False)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                        for a in args])
        for r, f in zip(real, fake):
            assert (f.shape, f.dtype) == (r.shape, r.dtype), op.name


def test_flce_opcheck():
    hidden = randn((7, 8), torch.float32, "cpu", seed=4)
    weight = randn((13, 8), torch.float32, "cpu", seed=5)
    bias = randn((13,), torch.float32, "cpu", seed=6)
    t = torch.tensor([0, 3, -100, 12, 2, 5, 7])
    options = (-100, 0.1, 1e-3, "mean")
    torch.library.opcheck(torch.ops.fastlab.fused_linear_cross_entropy_forward.default,
                          (hidden, weight, bias, t, *options, False, True, 4, torch.float32,
                           False))
    torch.library.opcheck(torch.ops.fastlab.fused_linear_cross_entropy_backward.default,
                          (hidden, weight, bias, t,
                           torch.tensor(2.0), *options, 4, torch.float32, False))


# ------------------------------------------------------------------------------ compiled

def _recorder(graphs):
    """A backend that keeps Dynamo's graph, then the forward and backward graphs of
    AOTAutograd (which it runs as aot_eager does)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    return backend


def _targets(gm) -> set:
    """Names of the ops a graph calls, with those of its subgraphs (an autograd.Function's
    body) and the ops inside auto_functionalized nodes."""
    names = set()
    for module in gm.modules():
        for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
            if node.op == "call_function":
                names.add(str(node.target))
                if "auto_functionalized" in str(node.target):
                    names.add(str(node.args[0]))
    return names


def _gpt_loss(loss: str, device="cpu"):
    """(model, loss function of a fixed batch) of a one-block GPT."""
    cfg = GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, d_model=16,
                    loss=loss)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, 37, (2, 9), device=device)
    targets = torch.randint(0, 37, (2, 9), device=device)
    targets[0, 3] = -100
    return model, lambda: model(idx, targets)[1]


def _value_and_grads(model, fn):
    value = fn()
    return value.detach(), torch.autograd.grad(value, list(model.parameters()))


@pytest.mark.parametrize("loss", ["logits", "fused"])
@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_gpt_block_compiles_in_one_graph_with_fastlab_ops(loss, path):
    """A GPT (attention, linear layers, cross-entropy or the fused head) compiled with
    fullgraph=True: no graph break, fastlab's ops named in the graphs, eager's values."""
    model, fn = _gpt_loss(loss)
    graphs = []
    with backend(path):
        want, want_grads = _value_and_grads(model, fn)
        compiled = torch.compile(fn, backend=_recorder(graphs), fullgraph=True)
        got, grads = _value_and_grads(model, compiled)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    dynamo, forward, backward = (_targets(g) for g in graphs[:3])
    loss_op = ("fastlab.cross_entropy_forward.default" if loss == "logits"
               else "fastlab.fused_linear_cross_entropy_forward.default")
    assert {"fastlab.attention_fwd.default", loss_op} <= dynamo
    # attention stays an opaque custom op; the loss ops are too where they are custom ops
    # (under the interpreter), and decomposed into their bodies where they are triton_ops
    assert "fastlab.attention_fwd.default" in forward
    assert "fastlab.attention_bwd.default" in backward
    if ce._forward.kind == "custom":
        assert loss_op in forward
        assert "fastlab.scale_grad.default" in backward


def test_triton_ops_trace_into_their_bodies_without_the_interpreter():
    """Without TRITON_INTERPRET (as on a GPU) the loss ops are triton_ops: torch.compile
    traces their bodies, here the reference path of CPU tensors, into the graph."""
    script = textwrap.dedent("""
        import torch
        import test_dispatch as T
        ce = T.ce

        assert ce._forward.kind == "triton", ce._forward.kind
        for loss in ("logits", "fused"):
            model, fn = T._gpt_loss(loss)
            want, want_grads = T._value_and_grads(model, fn)
            graphs = []
            compiled = torch.compile(fn, backend=T._recorder(graphs), fullgraph=True)
            got, grads = T._value_and_grads(model, compiled)
            torch.testing.assert_close(got, want)
            for g, w in zip(grads, want_grads):
                torch.testing.assert_close(g, w)
            dynamo, forward = T._targets(graphs[0]), T._targets(graphs[1])
            name = ("fastlab.cross_entropy_forward.default" if loss == "logits"
                    else "fastlab.fused_linear_cross_entropy_forward.default")
            assert name in dynamo and name not in forward, (loss, sorted(forward))
            assert "fastlab.attention_fwd.default" in forward
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["logits", "fused"])
def test_inductor_sees_the_cross_entropy_kernels(loss):
    """On CUDA, Inductor's code launches the cross-entropy Triton kernels itself (they come
    from the triton_ops' bodies) and calls the attention op."""
    from torch._inductor.utils import run_and_get_code

    model, fn = _gpt_loss(loss, "cuda")
    want, want_grads = _value_and_grads(model, fn)
    (got, grads), code = run_and_get_code(_value_and_grads, model,
                                          torch.compile(fn, fullgraph=True))
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    source = "\n".join(code)
    assert "_cross_entropy_kernel" in source
    assert "_scale_rows_kernel" in source
    assert "fastlab.attention_fwd" in source
