"""gp_posterior_covariance and GPRegression(return_covariance=True): the joint posterior covariance between test
points, on both solver paths, against the dense NumPy float64 posterior; its diagonal is gp_posterior_variance's,
its gradients agree across the paths and with finite differences, and it makes a MultivariateNormal;
GPRegression.posterior, that distribution built by the module, with GPyTorch's jitter where the covariance does not
factor."""
import numpy as np
import pytest
import torch

import opforge.kernels.kernel_sum as gp_mod
from opforge.kernels import GPRegression, gp_posterior_covariance, gp_posterior_mean, gp_posterior_variance
from opforge.reference import kernel_sum as ref

N, D = 23, 2
METHODS = pytest.mark.parametrize("method", ["cholesky", "cg"])


def _data(seed=0, n=N, t=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    xt = torch.cat([x[:2], torch.rand(t - 3, D, generator=g, dtype=dtype) * 3, x[:1] + 30])  # on, near, far
    return x, y, xt


def _np(t):
    return t.detach().double().numpy()


def _want(x, xt, kernel, noise, ls, os_):
    xn, tn = _np(x), _np(xt)
    A = ref.kernel_matrix(xn, xn, kernel, ls, os_) + noise * np.eye(len(xn))
    ks = ref.kernel_matrix(tn, xn, kernel, ls, os_)
    return ref.kernel_matrix(tn, tn, kernel, ls, os_) - ks @ np.linalg.solve(A, ks.T)


@METHODS
@pytest.mark.parametrize("kernel", ["gaussian", "laplacian", "matern52", "imq"])
def test_against_the_dense_posterior(kernel, method):
    """The covariance to float64 rounding (test points on training points, between them, and far away, where
    it is the prior's), symmetric, its diagonal the variance, ``include_noise`` adding noise I."""
    x, _, xt = _data()
    cov = gp_posterior_covariance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method)
    assert cov.shape == (9, 9) and cov.dtype == torch.float64
    np.testing.assert_allclose(_np(cov), _want(x, xt, kernel, 0.05, 0.7, 1.3), rtol=1e-9, atol=1e-11)
    assert torch.equal(cov, cov.mT)
    var = gp_posterior_variance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method)
    torch.testing.assert_close(cov.diagonal().clamp_min(0), var, rtol=1e-10, atol=1e-12)
    noisy = gp_posterior_covariance(x, xt, kernel, 0.05, 0.7, 1.3, tol=1e-12, method=method, include_noise=True)
    torch.testing.assert_close(noisy, cov + 0.05 * torch.eye(9, dtype=cov.dtype))


@METHODS
def test_batches_empty_and_lower_precision(method):
    """A batch of lengthscales gives each entry its own covariance; no test points, [..., 0, 0]; float32 and
    bfloat16 points come back in their dtype (bfloat16 through float32)."""
    x, _, xt = _data(1)
    ls = torch.tensor([0.5, 0.9], dtype=x.dtype).reshape(2, 1, 1)
    cov = gp_posterior_covariance(x, xt, "matern32", 0.05, ls, tol=1e-12, method=method)
    assert cov.shape == (2, 9, 9)
    for i in range(2):
        np.testing.assert_allclose(_np(cov[i]), _want(x, xt, "matern32", 0.05, float(ls[i]), 1.0), rtol=1e-9,
                                   atol=1e-11)
    assert gp_posterior_covariance(x, xt[:0], method=method).shape == (0, 0)
    for dtype in (torch.float32, torch.bfloat16):
        c = gp_posterior_covariance(x.to(dtype), xt.to(dtype), "matern32", 0.05, 0.7, method=method)
        assert c.dtype == dtype
        np.testing.assert_allclose(_np(c), _want(x.to(dtype), xt.to(dtype), "matern32", 0.05, 0.7, 1.0),
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_gradients_agree_across_paths_and_with_finite_differences():
    """gradcheck on the Cholesky path (x_train, x_test, lengthscale, outputscale, noise); the conjugate-gradient
    path's gradients equal its."""
    x, _, xt = _data(2, n=8, t=4)
    leaves = [x, xt[:3], torch.tensor(0.8, dtype=x.dtype), torch.tensor(1.2, dtype=x.dtype),
              torch.tensor(0.1, dtype=x.dtype)]
    leaves = [t.clone().requires_grad_() for t in leaves]

    def f(method):
        return lambda a, b, ls, os_, nz: gp_posterior_covariance(a, b, "matern52", nz, ls, os_, tol=1e-12,
                                                                 method=method)
    assert torch.autograd.gradcheck(f("cholesky"), leaves)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    grads = [torch.autograd.grad((f(m)(*leaves) * w).sum(), leaves) for m in ("cholesky", "cg")]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@METHODS
def test_gp_regression_returns_the_joint_posterior(method):
    """``gp(x_test, return_covariance=True)``: the posterior mean and covariance of the functions (and of the
    centred targets' mean constant), a MultivariateNormal with a 1e-8 jitter samples from it; asking for the
    variance too is an error."""
    x, y, xt = _data(3)
    gp = GPRegression(x, y, "matern52", lengthscale=0.7, noise=0.05, mean=0.2, tol=1e-12, method=method).double()
    ls, os_, nz, c = (t.detach() for t in (gp.lengthscale, gp.outputscale, gp.noise, gp.mean_constant))
    with torch.no_grad():
        mean, cov = gp(xt, return_covariance=True)
        _, cov_y = gp(xt, return_covariance=True, include_noise=True)
        want_mean = gp_posterior_mean(x, y - c, xt, "matern52", nz, ls, os_, tol=1e-12, method=method) + c
    torch.testing.assert_close(mean, want_mean)
    np.testing.assert_allclose(_np(cov), _want(x, xt, "matern52", float(nz), float(ls), float(os_)), rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(cov_y, cov + nz * torch.eye(9, dtype=cov.dtype))
    dist = torch.distributions.MultivariateNormal(mean, cov + 1e-8 * torch.eye(9, dtype=cov.dtype))
    assert dist.rsample((4,)).shape == (4, 9)
    with pytest.raises(ValueError, match="return_variance and return_covariance: ask for one"):
        gp(xt, return_variance=True, return_covariance=True)
    with pytest.raises(TypeError, match="return_covariance must be a bool"):
        gp(xt, return_covariance=1)


@METHODS
def test_a_batch_as_large_as_the_test_set(method):
    """Two point sets with two test points each: the identity whose columns give K(X, x*) is [2, 2], which
    kernel_matvec read as two vectors (a b [..., M, M] whose leading dims broadcast with the points') on the
    conjugate-gradient path, so the variance was 5% off and the covariance failed (found by
    tests/test_gp_fuzz.py). Both against the dense posterior, entry by entry."""
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 7, D, generator=g, dtype=torch.float64) * 3
    xt = torch.rand(2, 2, D, generator=g, dtype=torch.float64) * 3
    kw = dict(kernel="matern52", noise=0.05, lengthscale=0.8, tol=1e-12, precond_rank=7, method=method)
    var, cov = gp_posterior_variance(x, xt, **kw), gp_posterior_covariance(x, xt, **kw)
    assert var.shape == (2, 2) and cov.shape == (2, 2, 2)
    for b in range(2):
        want = _want(x[b], xt[b], "matern52", 0.05, 0.8, 1.0)
        np.testing.assert_allclose(_np(cov[b]), want, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(_np(var[b]), np.diag(want), rtol=1e-8, atol=1e-10)


def _gp(method, dtype=torch.float64, seed=3, **kw):
    x, y, xt = _data(seed, dtype=dtype)
    gp = GPRegression(x, y, "matern52", lengthscale=0.7, noise=0.05, mean=0.2, tol=1e-12, method=method, **kw)
    return gp.to(dtype), x, y, xt


@METHODS
def test_posterior_is_the_joint_distribution(method):
    """``gp.posterior(x_test)``: a MultivariateNormal whose mean and covariance are ``gp(x_test,
    return_covariance=True)``'s (the dense reference's), with the noise on the diagonal for
    ``observation_noise``; a batch of test sets is its batch shape; its log density is NumPy's of that
    Gaussian."""
    gp, x, y, xt = _gp(method)
    xt = xt[2:]  # (apart from the training points: a covariance that factors without jitter)
    with torch.no_grad():
        mean, cov = gp(xt, return_covariance=True)
        post, obs = gp.posterior(xt), gp.posterior(xt, observation_noise=True)
    assert isinstance(post, torch.distributions.MultivariateNormal)
    assert post.batch_shape == () and post.event_shape == (len(xt),) and post.loc.dtype == torch.float64
    torch.testing.assert_close(post.loc, mean)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=1e-10, atol=1e-13)
    nz = float(gp.noise.detach())
    want = _want(x, xt, "matern52", nz, float(gp.lengthscale.detach()), float(gp.outputscale.detach()))
    np.testing.assert_allclose(_np(post.covariance_matrix), want, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(_np(obs.covariance_matrix), want + nz * np.eye(len(xt)), rtol=1e-9, atol=1e-11)
    v = torch.randn(len(xt), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = _np(v - mean)
    C = want + nz * np.eye(len(xt))
    logpdf = -0.5 * (r @ np.linalg.solve(C, r) + np.linalg.slogdet(2 * np.pi * C)[1])
    np.testing.assert_allclose(float(obs.log_prob(v).detach()), logpdf, rtol=1e-9)
    batch = torch.stack([xt, xt.flip(0)])
    with torch.no_grad():
        both = gp.posterior(batch)
    assert both.batch_shape == (2,) and both.event_shape == (len(xt),)
    torch.testing.assert_close(both.covariance_matrix[0], cov, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(both.loc[1], mean.flip(0))


@METHODS
def test_posterior_samples_are_differentiable_in_the_test_points(method):
    """A reparametrised sample loc + L eps (what ``rsample`` draws) has gradients in x_test: gradcheck on the
    Cholesky path, and the two paths' gradients agree (Monte-Carlo acquisition functions optimise x_test
    through it)."""
    gp, x, y, xt = _gp(method)
    gp.requires_grad_(False)
    eps = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def sample(t):
        d = gp.posterior(t)
        return d.loc + (d.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    pts = xt[2:8].clone().requires_grad_()
    if method == "cholesky":
        assert torch.autograd.gradcheck(sample, (pts,))
    (g,) = torch.autograd.grad(sample(pts).sum(), pts)
    other = _gp("cholesky" if method == "cg" else "cg")[0].requires_grad_(False)
    d = other.posterior(pts)
    (g2,) = torch.autograd.grad((d.loc + (d.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)).sum(), pts)
    torch.testing.assert_close(g, g2, rtol=1e-6, atol=1e-8)
    assert gp.posterior(pts).rsample((5,)).shape == (5, 6)


def test_jitter_is_added_only_where_the_covariance_does_not_factor():
    """GPyTorch's psd_safe_cholesky: a batch entry that factors is left alone; one that does not gets the jitter
    (1e-8 in float64, 1e-6 in float32, or the one given), then 10 and 100 times it; past that, or with
    jitter=0, a ValueError."""
    for dtype, default in ((torch.float64, 1e-8), (torch.float32, 1e-6)):
        cov = torch.stack([torch.tensor([[2.0, 0.5], [0.5, 1.0]]), torch.ones(2, 2)]).to(dtype)  # PD, singular
        L = gp_mod._safe_cholesky(cov)
        assert torch.equal(L[0], torch.linalg.cholesky(cov[0]))
        torch.testing.assert_close(L[1] @ L[1].T, cov[1] + default * torch.eye(2, dtype=dtype))
        L = gp_mod._safe_cholesky(cov, jitter=0.01)
        torch.testing.assert_close(L[1] @ L[1].T, cov[1] + 0.01 * torch.eye(2, dtype=dtype))
        with pytest.raises(ValueError, match="jitter=0 adds nothing"):
            gp_mod._safe_cholesky(cov, jitter=0.0)
        # indefinite: eigenvalues 3 and -1, which no jitter up to 100x mends
        with pytest.raises(ValueError, match=f"even with {default * 100:g} added to its diagonal"):
            gp_mod._safe_cholesky(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=dtype))
    # (a jitter that mends it at its second try: 10x; the entry that needs none keeps none)
    cov = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0 - 5e-3]]], dtype=torch.float64)
    L = gp_mod._safe_cholesky(cov, jitter=1e-3)
    torch.testing.assert_close(L[1] @ L[1].T, cov[1] + 1e-2 * torch.eye(2, dtype=torch.float64))
    assert torch.equal(L[0], torch.eye(2, dtype=torch.float64))


@METHODS
def test_posterior_at_coincident_points_and_in_lower_precision(method):
    """Test points repeated and on the training points: float32's covariance is singular to rounding and the
    jitter makes it factor (the distribution is the covariance's within 1e-4); 16-bit data give a float32
    distribution, the float32 model's within bfloat16's rounding of the data."""
    gp, x, y, xt = _gp(method, dtype=torch.float32)
    pts = torch.cat([x[:4], x[:4], xt[2:5]])
    with torch.no_grad():
        _, cov = gp(pts, return_covariance=True)
        post = gp.posterior(pts)
    torch.testing.assert_close(post.covariance_matrix, cov, rtol=0, atol=2e-4)
    assert bool(torch.isfinite(post.rsample((3,))).all())
    gp16 = GPRegression(x.bfloat16(), y.bfloat16(), "matern52", lengthscale=0.7, noise=0.05, mean=0.2, method=method)
    with torch.no_grad():
        p16 = gp16.posterior(pts.bfloat16())
    assert p16.loc.dtype == p16.scale_tril.dtype == torch.float32
    torch.testing.assert_close(p16.covariance_matrix, cov, rtol=0, atol=0.05)
    torch.testing.assert_close(p16.loc, post.loc, rtol=0, atol=0.05 * float(post.loc.abs().max()))


def test_posterior_checks_its_arguments():
    gp, x, y, xt = _gp("auto")
    with pytest.raises(TypeError, match="observation_noise must be a bool"):
        gp.posterior(xt, observation_noise=1)
    for bad in (-1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="jitter must be None or a finite number >= 0"):
            gp.posterior(xt, jitter=bad)
    with pytest.raises(TypeError, match="jitter must be a number"):
        gp.posterior(xt, jitter="1e-6")
    with pytest.raises(ValueError, match="x_test has no points"):
        gp.posterior(xt[:0])
    with pytest.raises(ValueError, match="x_test must be"):
        gp.posterior(xt[:, :1])
    with pytest.raises(ValueError, match="posterior needs training data"):
        GPRegression().posterior(xt.float())
