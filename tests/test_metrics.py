"""Distillation metrics, CCA and Soft CCA against direct formulas and known answers.

CCA is checked on views built with known canonical correlations (shared latent pairs with a
chosen correlation each, mixed by random invertible maps, which CCA does not see) and
against an independent float64 implementation (QR of each centred view, singular values of
Qx^T Qy: no covariance, no eigh). SDL is replayed step by step from its definition.
"""
import numpy as np
import pytest
import torch

from fastlab.metrics import (SoftCCALoss, WindowedCCA, cca, cosine, distill_metrics,
                             mask_mean, mse, normalized_mse, sdl_loss)
from fastlab.testing import assert_close, make_generator, randn

#: the canonical correlations the views are built with; the extra dimensions have none
RHOS = (0.95, 0.8, 0.6, 0.3)


def _views(n, rhos=RHOS, dim_x=6, dim_y=5, seed=0, dtype=torch.float64):
    """(x, y) whose population canonical correlations are ``rhos`` followed by zeros."""
    g = make_generator(seed)
    r = len(rhos)
    rho = torch.tensor(rhos, dtype=torch.float64)
    u = torch.randn(n, r, generator=g, dtype=torch.float64)
    v = rho * u + (1 - rho**2).sqrt() * torch.randn(n, r, generator=g, dtype=torch.float64)
    x = torch.cat([u, torch.randn(n, dim_x - r, generator=g, dtype=torch.float64)], 1)
    y = torch.cat([v, torch.randn(n, dim_y - r, generator=g, dtype=torch.float64)], 1)
    mix_x = torch.randn(dim_x, dim_x, generator=g, dtype=torch.float64) + 2 * torch.eye(dim_x)
    mix_y = torch.randn(dim_y, dim_y, generator=g, dtype=torch.float64) + 2 * torch.eye(dim_y)
    return (x @ mix_x).to(dtype), (y @ mix_y + 3.0).to(dtype)


def _cca_qr(x, y):
    """Canonical correlations by QR of the centred views (numpy, float64)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


# --- CCA -----------------------------------------------------------------------------------

def test_cca_recovers_known_canonical_correlations():
    n = 40_000
    x, y = _views(n)
    got = cca(x, y)
    expected = torch.tensor(RHOS + (0.0,), dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert torch.all(got[:-1] >= got[1:])
    # sampling error of a correlation rho is about (1 - rho^2) / sqrt(n) (0.005 here); a
    # zero one is biased up by about sqrt(dims / n)
    torch.testing.assert_close(got, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, dim_x, dim_y", [(500, 6, 5), (97, 3, 7), (1000, 1, 4)])
def test_cca_matches_an_independent_implementation(dtype, n, dim_x, dim_y):
    x, y = _views(n, RHOS[:min(dim_x, dim_y, 4)], dim_x, dim_y, seed=n, dtype=dtype)
    # float32 inputs are converted to float64 inside: the reference sees the same values
    expected = torch.from_numpy(_cca_qr(x.double(), y.double()))
    assert_close(cca(x, y), expected, torch.float64, scale=100)


def test_cca_top_k_mask_and_offsets():
    x, y = _views(800, seed=3)
    full = cca(x, y)
    assert_close(cca(x, y, k=2), full[:2], torch.float64)
    assert cca(x, y, k=2).shape == (2,)
    mask = randn((800,), seed=4) > 0.3
    assert_close(cca(x, y, mask=mask), cca(x[mask], y[mask]), torch.float64, scale=100)
    # two-pass centring: a large common offset costs no digits
    assert_close(cca(x + 1e6, y - 1e6), full, torch.float64, scale=1e3)
    for k in (0, 6):
        with pytest.raises(ValueError, match="k must be"):
            cca(x, y, k=k)


def test_cca_ignores_collinear_and_constant_features():
    x, y = _views(600, seed=5)
    wide = torch.cat([x, x[:, :1] * 2 - x[:, 1:2], torch.full_like(x[:, :1], 7.0)], 1)
    got = cca(wide, y)
    assert torch.isfinite(got).all()
    # the redundant columns add no correlation: the same ones as x alone
    assert_close(got, cca(x, y), torch.float64, scale=1e4)


def test_cca_propagates_nan_and_reports_zero_for_constant_views():
    x, y = _views(50)
    x[3, 1] = float("nan")
    assert torch.isnan(cca(x, y)).all()
    assert torch.equal(cca(torch.zeros_like(x), y), torch.zeros(5, dtype=torch.float64))


def test_cca_rejects_bad_inputs():
    x, y = _views(10)
    with pytest.raises(ValueError, match="same number of rows"):
        cca(x, y[:9])
    with pytest.raises(ValueError, match="2-D"):
        cca(x[0], y[0])
    with pytest.raises(TypeError, match="floating-point"):
        cca(x.long(), y)
    with pytest.raises(ValueError, match="mask must have shape"):
        cca(x, y, mask=torch.ones(9, dtype=torch.bool))


# --- windowed CCA --------------------------------------------------------------------------

@pytest.mark.parametrize("multiple", [5, 10])
def test_windowed_cca_forgets_what_left_the_window(multiple):
    dim, rows = 4, 64
    window = multiple * dim
    metric = WindowedCCA(dim, window)
    g = make_generator(multiple)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]  # every direction alike
    steps_x, steps_y = [], []
    for step in range(2 * window):
        x = torch.randn(2, rows // 2, dim, generator=g)  # leading dims are rows too
        if step < window:  # correlated block, then an independent one
            y = x @ mix + 0.1 * torch.randn(x.shape, generator=g)
        else:
            y = torch.randn(x.shape, generator=g)
        metric.update(x, y)
        steps_x.append(x.reshape(-1, dim))
        steps_y.append(y.reshape(-1, dim))
        if step == window // 2 - 1:  # half full: the window is what was seen
            assert metric.steps == window // 2
            assert_close(metric.compute(), cca(torch.cat(steps_x), torch.cat(steps_y)),
                         torch.float64, scale=100)
        if step == window + window // 2 - 1:  # half the correlated block is still in
            assert metric.compute().min() > 0.4
    assert metric.steps == window
    got = metric.compute()
    assert_close(got, cca(torch.cat(steps_x[-window:]), torch.cat(steps_y[-window:])),
                 torch.float64, scale=100)
    # independent views: what is left is the sampling noise of window * rows rows
    assert got.max() < 6 * (dim / (window * rows)) ** 0.5


def test_windowed_cca_masks_k_and_state_dict():
    dim, window, rows = 3, 6, 20
    metric = WindowedCCA(dim, window, k=2, dim_y=5)
    kept_x, kept_y = [], []
    for step in range(9):
        x, y = _views(rows, RHOS[:3], dim, 5, seed=step, dtype=torch.float32)
        mask = randn((rows,), seed=100 + step) > -0.5
        metric.update(x, y, mask)
        kept_x.append(x[mask])
        kept_y.append(y[mask])
    expected = cca(torch.cat(kept_x[-window:]), torch.cat(kept_y[-window:]), k=2)
    assert_close(metric.compute(), expected, torch.float64, scale=100)

    resumed = WindowedCCA(dim, window, k=2, dim_y=5)
    resumed.load_state_dict(metric.state_dict())
    x, y = _views(rows, RHOS[:3], dim, 5, seed=50, dtype=torch.float32)
    metric.update(x, y)
    resumed.update(x, y)
    assert torch.equal(metric.compute(), resumed.compute())
    metric.reset()
    assert metric.steps == 0
    with pytest.raises(ValueError, match="at least one update"):
        metric.compute()


def test_windowed_cca_rejects_bad_inputs():
    with pytest.raises(ValueError, match="window must be"):
        WindowedCCA(4, 0)
    with pytest.raises(ValueError, match="k must be"):
        WindowedCCA(4, 10, k=5)
    metric = WindowedCCA(4, 10)
    metric.update(randn((8, 4)), randn((8, 4), seed=1))
    with pytest.raises(ValueError, match="same number of rows"):
        metric.update(randn((9, 4)), randn((9, 4), seed=1))
    with pytest.raises(ValueError, match=r"y must be \(\.\.\., 4\)"):
        metric.update(randn((8, 4)), randn((8, 3), seed=1))
    with pytest.raises(ValueError, match="mask must be"):
        metric.update(randn((8, 4)), randn((8, 4), seed=1), torch.ones(8))


# --- mse, normalised mse, cosine -----------------------------------------------------------

def _direct(student, teacher, mask):
    """The three metrics by their textbook formulas over the selected rows (float64)."""
    s = student.double().reshape(-1, student.shape[-1])
    t = teacher.double().reshape(-1, student.shape[-1])
    if mask is not None:
        s, t = s[mask.reshape(-1)], t[mask.reshape(-1)]
    err = ((s - t) ** 2).sum()
    cos = torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(s, t)])
    return {"mse": err / s.numel(), "nmse": err / ((t - t.mean(0)) ** 2).sum(),
            "cosine": cos.mean()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 17), (1, 1, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_distill_metrics_match_direct_formulas(dtype, shape, masked):
    teacher = randn(shape, dtype, seed=1, scale=2.0)
    student = (teacher.float() + randn(shape, seed=2)).to(dtype)
    mask = None
    if masked:
        mask = randn(shape[:-1], seed=3) > 0
        mask.view(-1)[0] = True  # at least one counted row
    # the inputs are exact in their dtype; sums accumulate in float32 (float64 for float64)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    expected = _direct(student, teacher, mask)
    for name, fn in (("mse", mse), ("nmse", normalized_mse), ("cosine", cosine)):
        got = fn(student, teacher, mask)
        assert got.shape == () and got.dtype == accumulate
        # (one counted row has no teacher variance: nmse is inf, in both)
        assert_close(got, expected[name], accumulate, scale=10, msg=name)


def test_distill_metrics_dict_and_mask_mean():
    teacher = randn((4, 6, 8), seed=1)
    student = teacher + 0.1 * randn((4, 6, 8), seed=2)
    mask = randn((4, 6), seed=3) > 0
    out = distill_metrics(student, teacher, mask)
    assert set(out) == {"mse", "nmse", "cosine", "mse/mask", "nmse/mask", "cosine/mask",
                        "mask_mean"}
    assert_close(out["mask_mean"], mask.double().mean(), torch.float32)
    assert_close(out["mse/mask"], mse(student[mask], teacher[mask]), torch.float32)
    assert_close(out["cosine"], cosine(student, teacher), torch.float32)
    assert set(distill_metrics(student, teacher)) == {"mse", "nmse", "cosine"}
    assert not any(v.requires_grad for v in
                   distill_metrics(student.requires_grad_(), teacher).values())
    # perfect student, and an empty selection (NaN rather than a silent 0)
    assert mse(teacher, teacher) == 0 and normalized_mse(teacher, teacher) == 0
    assert_close(cosine(teacher, teacher), torch.tensor(1.0), torch.float32)
    assert torch.isnan(mse(student, teacher, torch.zeros(4, 6, dtype=torch.bool)))
    assert mask_mean(torch.zeros(3, dtype=torch.bool)) == 0


def test_distill_metrics_gradients_and_errors():
    teacher = randn((5, 4), torch.float64, seed=1)
    student = randn((5, 4), torch.float64, seed=2, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False])
    for fn in (mse, normalized_mse, cosine):
        assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask), (student,))
    with pytest.raises(ValueError, match="same shape"):
        mse(student, teacher[:4])
    with pytest.raises(TypeError, match="mask must be a bool"):
        mse(student, teacher, mask.float())
    with pytest.raises(ValueError, match="mask must have the rows' shape"):
        cosine(student, teacher, mask[:4])
    with pytest.raises(TypeError, match="floating-point"):
        normalized_mse(student, teacher.long())


# --- SDL / Soft CCA ------------------------------------------------------------------------

def _sdl_direct(batches, alpha, eps):
    """SDL of each step from its definition, in float64 numpy."""
    running, weight, losses = None, 0.0, []
    for z in batches:
        z = np.asarray(z.detach(), np.float64).reshape(-1, z.shape[-1])
        m = z.shape[0]
        z = z - z.mean(0)
        z = z / np.sqrt((z**2).sum(0) / (m - 1) + eps)
        batch_cov = z.T @ z / (m - 1)
        running = batch_cov if running is None else alpha * running + batch_cov
        weight = alpha * weight + 1.0
        cov = running / weight
        losses.append(np.abs(cov).sum() - np.abs(np.diag(cov)).sum())
    return losses


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_soft_cca_matches_direct_formula_step_by_step(alpha):
    dim, eps, lam = 5, 1e-5, 0.3
    module = SoftCCALoss(dim, alpha, lam, eps=eps)
    xs = [randn((3, 11, dim), torch.float64, seed=s) for s in range(6)]
    ys = [(x + randn(x.shape, torch.float64, seed=50 + s)) for s, x in enumerate(xs)]
    sdl_x, sdl_y = _sdl_direct(xs, alpha, eps), _sdl_direct(ys, alpha, eps)
    running = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for step, (x, y) in enumerate(zip(xs, ys)):
        out = module(x, y)
        zx = np.asarray(x.reshape(-1, dim))
        zy = np.asarray(y.reshape(-1, dim))
        zx = (zx - zx.mean(0)) / np.sqrt(zx.var(0, ddof=1) + eps)
        zy = (zy - zy.mean(0)) / np.sqrt(zy.var(0, ddof=1) + eps)
        distance = ((zx - zy) ** 2).sum(1).mean()
        decorrelation = sdl_x[step] + sdl_y[step]
        # the module's running sums are float32 buffers
        assert_close(out.distance, torch.tensor(distance), torch.float32)
        assert_close(out.decorrelation, torch.tensor(decorrelation), torch.float32)
        assert_close(out.loss, torch.tensor(distance + lam * decorrelation), torch.float32)
        loss, *running = sdl_loss(x, *running, alpha, eps=eps)
        assert_close(loss, torch.tensor(sdl_x[step]), torch.float64)
    assert module.cov_weight == sum(alpha**i for i in range(6))


def test_soft_cca_state_eval_and_gradients():
    dim = 4
    module = SoftCCALoss(dim, alpha=0.7)
    x = randn((16, dim), seed=1, requires_grad=True)
    y = randn((16, dim), seed=2, requires_grad=True)
    out = module(x, y)
    out.loss.backward()
    assert x.grad is not None and y.grad is not None
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert set(module.state_dict()) == {"cov_x", "cov_y", "cov_weight"}

    resumed = SoftCCALoss(dim, alpha=0.7)
    resumed.load_state_dict(module.state_dict())
    module.eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x2, y2 = randn((16, dim), seed=3), randn((16, dim), seed=4)
    assert torch.equal(module(x2, y2).loss, resumed(x2, y2).loss)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert resumed.cov_weight == 1 + 0.7  # training mode advanced it

    # the functional form is differentiable through this step's batch, in float64
    z = randn((9, 3), torch.float64, seed=5, requires_grad=True)
    state = randn((3, 3), torch.float64, seed=6), torch.tensor(2.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sdl_loss(z, *state, 0.5)[0], (z,))


def test_soft_cca_decreases_on_correlated_views():
    """Two linear encoders of two noisy views of a shared latent learn correlated,
    decorrelated outputs: the loss falls and the outputs' canonical correlations rise."""
    torch.manual_seed(0)
    latent, inputs, dim, batch = 3, 8, 3, 128
    g = make_generator(7)
    mix_a = torch.randn(latent, inputs, generator=g)
    mix_b = torch.randn(latent, inputs, generator=g)

    def views(n):
        z = torch.randn(n, latent, generator=g)
        return (z @ mix_a + 0.3 * torch.randn(n, inputs, generator=g),
                z @ mix_b + 0.3 * torch.randn(n, inputs, generator=g))

    enc_a, enc_b = torch.nn.Linear(inputs, dim), torch.nn.Linear(inputs, dim)
    loss_fn = SoftCCALoss(dim, alpha=0.8, lam=0.5)
    opt = torch.optim.Adam([*enc_a.parameters(), *enc_b.parameters()], lr=2e-2)
    losses = []
    for _ in range(150):
        a, b = views(batch)
        loss = loss_fn(enc_a(a), enc_b(b)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    with torch.no_grad():
        a, b = views(2000)
        assert cca(enc_a(a), enc_b(b)).min() > 0.8


def test_soft_cca_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be"):
        SoftCCALoss(4, alpha=1.5)
    with pytest.raises(ValueError, match="dim must be"):
        SoftCCALoss(0)
    module = SoftCCALoss(4)
    with pytest.raises(ValueError, match="at least 2 rows"):
        module(randn((1, 4)), randn((1, 4)))
    with pytest.raises(ValueError, match="same shape"):
        module(randn((6, 4)), randn((5, 4)))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 4\)"):
        module(randn((6, 3)), randn((6, 3)))
