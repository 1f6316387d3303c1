"""GPRegression, the exact-GP module: against the NumPy float64 references (the Cholesky log-likelihood, the dense
posterior) and, where GPyTorch is installed (``.ci/run`` installs it beside the tests), against GPyTorch itself
with the same state dict: its ExactMarginalLogLikelihood and its posterior mean and variances.

The marginal likelihood is exact here wherever it is compared with a value: on the Cholesky path (``method``,
the default "auto" for these sizes) by construction, on the conjugate-gradient one because a preconditioner of
rank N is the matrix itself, which leaves no randomness in the log-determinant (tests/test_gp.py). The checks
against values run on both paths."""
import math

import numpy as np
import pytest
import torch

import opforge.kernels.kernel_sum as gp_mod
from opforge.kernels import GPRegression, gp_marginal_log_likelihood, gp_posterior_mean, gp_posterior_variance
from opforge.reference import kernel_sum as ref

N, D = 40, 3
METHODS = pytest.mark.parametrize("method", ["cg", "cholesky"])

# GPyTorch's ExactGP(ConstantMean, ScaleKernel(base), GaussianLikelihood): its state dict, in its order
KEYS = [
    ("likelihood.noise_covar.raw_noise", (1,)),
    ("likelihood.noise_covar.raw_noise_constraint.lower_bound", ()),
    ("likelihood.noise_covar.raw_noise_constraint.upper_bound", ()),
    ("mean_module.raw_constant", ()),
    ("covar_module.raw_outputscale", ()),
    ("covar_module.base_kernel.raw_lengthscale", (1, D)),
    ("covar_module.base_kernel.raw_lengthscale_constraint.lower_bound", ()),
    ("covar_module.base_kernel.raw_lengthscale_constraint.upper_bound", ()),
    ("covar_module.raw_outputscale_constraint.lower_bound", ()),
    ("covar_module.raw_outputscale_constraint.upper_bound", ()),
]


def _data(seed=0, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, D, generator=g, dtype=dtype) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype) + 2.0
    xt = torch.rand(9, D, generator=g, dtype=dtype) * 3.5 - 0.25
    return x, y, xt


def _np(t):
    return t.detach().double().numpy()


def _model(kernel="matern52", seed=0, **kw):
    x, y, xt = _data(seed)
    gp = GPRegression(x, y, kernel, ard_num_dims=D, lengthscale=torch.tensor([0.7, 1.1, 0.9]), outputscale=1.3,
                      noise=0.05, mean=1.5, precond_rank=N, tol=1e-11, **kw).double()
    return gp, x, y, xt


def _hypers(gp):
    return (_np(gp.lengthscale).reshape(-1), *(float(t.detach()) for t in (gp.outputscale, gp.noise, gp.mean_constant)))


def test_state_dict_is_gpytorchs():
    gp = GPRegression(kernel="gaussian", ard_num_dims=D)
    sd = gp.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == KEYS
    assert float(sd["likelihood.noise_covar.raw_noise_constraint.lower_bound"]) == pytest.approx(1e-4)
    assert all(math.isinf(float(v)) for k, v in sd.items() if k.endswith("upper_bound"))
    assert gp.lengthscale.shape == (1, D) and gp.outputscale.shape == () and gp.noise.shape == (1,)
    assert GPRegression().lengthscale.shape == (1, 1)


def test_hyperparameters_are_softplus_of_the_raw_ones():
    gp = GPRegression(kernel="matern32", ard_num_dims=2, lengthscale=torch.tensor([0.5, 2.0]), outputscale=3.0,
                      noise=0.02, mean=-1.0)
    np.testing.assert_allclose(_np(gp.lengthscale), [[0.5, 2.0]], rtol=1e-6)  # (float32 parameters)
    gp = gp.double()
    gp.outputscale, gp.noise = 3.0, 0.02
    np.testing.assert_allclose(float(gp.outputscale.detach()), 3.0, rtol=1e-12)
    np.testing.assert_allclose(_np(gp.noise), [0.02], rtol=1e-12)
    assert float(gp.mean_constant.detach()) == -1.0
    nc = gp.likelihood.noise_covar  # GreaterThan(1e-4), its bound a float32 buffer as GPyTorch's
    np.testing.assert_allclose(_np(nc.raw_noise), np.log(np.expm1(0.02 - float(nc.raw_noise_constraint.lower_bound))),
                               rtol=1e-12)
    gp.lengthscale = 0.25  # a number fills every dimension
    np.testing.assert_allclose(_np(gp.lengthscale), [[0.25, 0.25]], rtol=1e-12)
    for name, bad, err in (("noise", 1e-5, ValueError), ("noise", float("nan"), ValueError),
                           ("outputscale", 0.0, ValueError), ("lengthscale", torch.ones(3), ValueError),
                           ("lengthscale", True, TypeError), ("outputscale", "1", TypeError),
                           ("mean_constant", float("inf"), ValueError)):
        with pytest.raises(err, match=name):
            setattr(gp, name, bad)


@METHODS
@pytest.mark.parametrize("kernel", ["laplacian", "matern32", "matern52"])
def test_against_the_references(kernel, method):
    """The log-likelihood of the centred targets, the posterior mean (dense solve) and both variances."""
    gp, x, y, xt = _model(kernel, method=method)
    ls, os_, noise, c = _hypers(gp)
    xn, yn, tn = _np(x), _np(y), _np(xt)
    got = gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(0))
    want = ref.gp_log_marginal_likelihood(xn, yn - c, kernel, noise, ls, os_)
    np.testing.assert_allclose(float(got.detach()), want, rtol=1e-9)
    A = ref.kernel_matrix(xn, xn, kernel, ls, os_) + noise * np.eye(N)
    mean_want = c + ref.kernel_matrix(tn, xn, kernel, ls, os_) @ np.linalg.solve(A, yn - c)
    var_want = ref.gp_posterior_variance(xn, tn, kernel, noise, ls, os_)
    with torch.no_grad():
        mean, var = gp(xt, return_variance=True)
        _, var_y = gp(xt, return_variance=True, include_noise=True)
    np.testing.assert_allclose(_np(mean), mean_want, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(_np(var), var_want, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(_np(var_y), var_want + noise, rtol=1e-7, atol=1e-10)


@METHODS
def test_gradients_are_the_functions_through_the_constraints(method):
    """The raw parameters' gradients: the function's gradients in the constrained values (same probes) times
    softplus' = sigmoid(raw), and the mean's -sum of the data-fit gradient in y."""
    gp, x, y, _ = _model("matern52", num_probes=4, method=method)
    gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(3)).backward()
    ls, os_, nz = (t.detach().clone().requires_grad_() for t in (gp.lengthscale, gp.outputscale, gp.noise))
    yc = (y - gp.mean_constant.detach()).requires_grad_()
    out = gp_marginal_log_likelihood(x, yc, "matern52", nz, ls, os_, num_probes=4, tol=1e-11, precond_rank=N,
                                     generator=torch.Generator().manual_seed(3), method=method)
    g_ls, g_os, g_nz, g_y = torch.autograd.grad(out, [ls, os_, nz, yc])
    ck, nc = gp.covar_module, gp.likelihood.noise_covar
    for raw, g in ((ck.base_kernel.raw_lengthscale, g_ls), (ck.raw_outputscale, g_os), (nc.raw_noise, g_nz)):
        np.testing.assert_allclose(_np(raw.grad), _np(g * torch.sigmoid(raw.detach())), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(gp.mean_module.raw_constant.grad), -float(g_y.sum()), rtol=1e-10)


def test_predictions_reuse_the_weights_until_something_changes(monkeypatch):
    """On the conjugate-gradient path (whose new solves start from the kept weights): a solve per change."""
    gp, x, y, xt = _model("matern32", method="cg")
    calls = []
    solve = gp_mod.kernel_solve
    monkeypatch.setattr(gp_mod, "kernel_solve", lambda *a, **k: calls.append(k.get("x0")) or solve(*a, **k))
    with torch.no_grad():
        m1 = gp(xt)
        m2 = gp(xt[:4])
        assert len(calls) == 1 and calls[0] is None
        torch.testing.assert_close(m1[:4], m2, rtol=0, atol=0)
        gp.noise = 0.2  # a new value: a new solve, from the last weights
        m3 = gp(xt)
        assert len(calls) == 2 and calls[1] is not None
        gp.train_y.add_(1.0)  # the data changed in place: a new solve too
        gp(xt)
        assert len(calls) == 3
        gp.likelihood.noise_covar.raw_noise_constraint.lower_bound.fill_(1e-3)  # a bound: the noise moved
        gp(xt)
        assert len(calls) == 4
    # gradients wanted (parameters requiring grad, grad mode on): a solve every call, and the mean carries them
    m = gp(xt)
    assert len(calls) == 5 and m.requires_grad
    m.sum().backward()
    assert all(p.grad is not None for p in gp.parameters())
    fresh, *_ = _model("matern32", method="cg")
    fresh.noise = 0.2
    with torch.no_grad():
        torch.testing.assert_close(m3, fresh(xt), rtol=1e-9, atol=1e-10)
        gp._cache = None  # (the kept weights, once dropped, give the same predictions as a fresh solve)
        torch.testing.assert_close(gp(xt), m, rtol=1e-9, atol=1e-10)


def test_variance_keeps_its_factor_until_something_changes(monkeypatch):
    """On the Cholesky path the training matrix's factor is kept like the weights: repeated predictions with
    variances factor it once (the weights come from it too), a new parameter value factors again, and
    wherever a gradient in the parameters is wanted the weights' solve and the variance factor it anew,
    recorded."""
    gp, x, y, xt = _model("matern52", method="cholesky")
    built = []
    factor = gp_mod._dense_factor
    monkeypatch.setattr(gp_mod, "_dense_factor", lambda *a, **k: built.append(1) or factor(*a, **k))
    with torch.no_grad():
        mean, _ = gp(xt, return_variance=True)
        assert len(built) == 1  # one factor: the weights' and the variance's
        for t in (xt[:3], xt[2:], xt):
            _, kept = gp(t, return_variance=True)
        assert len(built) == 1
        want = gp_posterior_variance(x, xt, "matern52", gp.noise, gp.lengthscale, gp.outputscale, method="cholesky")
        torch.testing.assert_close(kept, want, rtol=1e-12, atol=1e-14)
        c = gp.mean_constant
        want_mean = gp_posterior_mean(x, y - c, xt, "matern52", gp.noise, gp.lengthscale, gp.outputscale,
                                      method="cholesky") + c
        torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-14)
        assert len(built) == 3  # (those calls' own)
        gp.noise = 0.2
        _, kept = gp(xt, return_variance=True)
        assert len(built) == 4
        gp.train_y.add_(1.0)  # the data changed in place: new weights (the mean moves), the same variances
        shifted, again = gp(xt, return_variance=True)
        gp.train_y.sub_(1.0)
        back = gp(xt)
        assert len(built) == 6 and not torch.allclose(shifted, back)
        torch.testing.assert_close(again, kept, rtol=1e-12, atol=1e-14)
    want = gp_posterior_variance(x, xt, "matern52", gp.noise, gp.lengthscale, gp.outputscale, method="cholesky")
    torch.testing.assert_close(kept, want.detach(), rtol=1e-12, atol=1e-14)
    mean, var = gp(xt, return_variance=True)  # (the parameters require grad: nothing kept is used)
    assert len(built) == 9 and var.requires_grad and mean.requires_grad  # (7 before: the function's own)
    torch.testing.assert_close(var.detach(), kept, rtol=1e-12, atol=1e-14)


@METHODS
def test_condition_on_observations(method, monkeypatch):
    """``condition_on_observations(x, y)``: a new model on the training data and the new points, with copies of
    the parameters, whose predictions are those of a model built on all the data; this one is unchanged. On the
    Cholesky path, with this model's factor kept, the new model's factor is it extended (no factorisation at
    its first prediction), equal to the factor of the whole matrix."""
    gp, x, y, xt = _model("matern52", method=method)
    g = torch.Generator().manual_seed(11)
    xn = torch.rand(6, D, generator=g, dtype=torch.float64) * 3
    yn = torch.sin(xn.sum(-1)) + 2.0
    with torch.no_grad():
        before = gp(xt, return_variance=True)  # (the factor kept, on the Cholesky path)
    built = []
    factor = gp_mod._dense_factor
    monkeypatch.setattr(gp_mod, "_dense_factor", lambda *a, **k: built.append(1) or factor(*a, **k))
    new = gp.condition_on_observations(xn, yn)
    with torch.no_grad():
        got = new(xt, return_variance=True)
    assert len(built) == 0 if method == "cholesky" else new._factor is None
    whole = GPRegression(torch.cat([x, xn]), torch.cat([y, yn]), "matern52", ard_num_dims=D, precond_rank=N + 6,
                         tol=1e-11, method=method).double()
    whole.load_state_dict(gp.state_dict())
    with torch.no_grad():
        want = whole(xt, return_variance=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if method == "cholesky":
        with torch.no_grad():
            L = factor(new.train_x, "matern52", new.noise, new.lengthscale, new.outputscale, "test", "cholesky")[0]
        torch.testing.assert_close(new._factor[1], L, rtol=1e-10, atol=1e-12)
    assert gp.train_x.shape == (N, D) and new.train_x.shape == (N + 6, D)
    with torch.no_grad():
        for a, b in zip(gp(xt, return_variance=True), before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    new.noise = 0.3  # (the parameters are copies)
    assert float(gp.noise.detach()) == pytest.approx(0.05) and new.method == method and new.tol == 1e-11
    prior = GPRegression(kernel="matern52").double().condition_on_observations(xn, yn)  # (no data before)
    assert prior.train_x.shape == (6, D)
    for bad, match in (((xn[:, :2], yn), "D=3 dimensions"), ((xn, yn[:5]), "N=6"), ((xn.float(), yn.float()),
                       "dtype and device"), ((xn * float("nan"), yn), "finite"), ((xn[0], yn[:1]), "points")):
        with pytest.raises((ValueError, TypeError), match=match):
            gp.condition_on_observations(*bad)


@METHODS
def test_fit_raises_the_likelihood(method):
    x, y, _ = _data(4, n=60)
    gp = GPRegression(x, y, "matern52", lengthscale=0.2, outputscale=0.3, noise=0.5, precond_rank=60,
                      tol=1e-9, method=method).double()
    before = _hypers(gp)
    losses = gp.fit(steps=30, lr=0.1, generator=torch.Generator().manual_seed(0))
    after = _hypers(gp)
    assert len(losses) == 30 and losses[-1] < losses[0]
    want = [ref.gp_log_marginal_likelihood(_np(x), _np(y) - h[3], "matern52", h[2], h[0], h[1])
            for h in (before, after)]
    assert want[1] > want[0] + 10
    assert all(a != b for a, b in zip(before[1:], after[1:]))


def _optimum(x, y, kernel):
    """The reference log-likelihood's maximum per point over (mean, outputscale, noise, lengthscale), by scipy's
    L-BFGS-B from a start near the data's scale (the values softplus of free variables, noise above 1e-4)."""
    import scipy.optimize

    xn, yn = _np(x), _np(y)

    def loss(v):
        sp = np.logaddexp(0, v[1:])
        return -ref.gp_log_marginal_likelihood(xn, yn - v[0], kernel, 1e-4 + sp[1], sp[2], sp[0]) / len(yn)
    res = scipy.optimize.minimize(loss, np.array([float(yn.mean()), 0.0, -2.0, 0.0]), method="L-BFGS-B")
    return res.fun


@METHODS
def test_lbfgs_fit_reaches_the_optimum(method):
    """``fit(optimizer="lbfgs")``: quasi-Newton steps with a strong-Wolfe line search reach the reference
    likelihood's optimum (scipy's L-BFGS-B on it) where Adam, in as many steps, is still far from it; on the
    conjugate-gradient path the probes are the same at every evaluation (two fits with one seed agree), and the
    optimum found is the one of that sample of the likelihood: within 0.02 of the loss (from 2.9 at the start;
    the pivoted-Cholesky preconditioner stops short of rank N as the fitted noise shrinks, which leaves the
    log-determinant an estimate)."""
    x, y, _ = _data(4, n=40)
    best = _optimum(x, y, "matern52")
    kw = dict(lengthscale=0.2, outputscale=0.3, noise=0.5, precond_rank=40, tol=1e-10, method=method)
    runs = []
    for _ in range(2 if method == "cg" else 1):
        gp = GPRegression(x, y, "matern52", **kw).double()
        losses = gp.fit(steps=25, optimizer="lbfgs", generator=torch.Generator().manual_seed(0))
        runs.append(losses)
        final = -float(gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(1)).detach()) / len(y)
        assert final == pytest.approx(best, rel=1e-5, abs=1e-6 if method == "cholesky" else 0.02), (final, best)
    assert runs[0] == runs[-1] and len(runs[0]) == 25 and runs[0][-1] < runs[0][0]
    adam = GPRegression(x, y, "matern52", **kw).double()
    assert adam.fit(steps=25, generator=torch.Generator().manual_seed(0))[-1] > best + 0.1


@pytest.mark.parametrize("kernel,base", [("gaussian", "RBFKernel"), ("laplacian", "MaternKernel-0.5"),
                                         ("matern32", "MaternKernel-1.5"), ("matern52", "MaternKernel-2.5")])
@pytest.mark.parametrize("ard", [None, D])
@METHODS
def test_matches_gpytorch(kernel, base, ard, method):
    """GPyTorch's own model with random raw parameters; its state dict loaded here (and this one's there):
    GPyTorch's ExactMarginalLogLikelihood times N, its posterior mean, latent and observed variances,
    latent covariance and distributions (``posterior``)."""
    gpytorch = pytest.importorskip("gpytorch")
    x, y, xt = _data(5)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, lik):
            super().__init__(x, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            name, _, nu = base.partition("-")
            kw = dict(nu=float(nu)) if nu else {}
            self.covar_module = gpytorch.kernels.ScaleKernel(getattr(gpytorch.kernels, name)(ard_num_dims=ard, **kw))

        def forward(self, t):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(t), self.covar_module(t))

    lik = gpytorch.likelihoods.GaussianLikelihood()
    model = Model(lik).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.5)
    gp = GPRegression(x, y, kernel, ard_num_dims=ard, precond_rank=N, tol=1e-12, method=method).double()
    gp.load_state_dict(model.state_dict())
    model.train(), lik.train()
    want = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y) * N
    got = gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(0))
    # (on the conjugate-gradient path, the Gaussian's pivoted Cholesky factor stops short of rank N where the
    # rest of the diagonal is tiny: a preconditioner within 1e-4 of the matrix, tests/test_gp.py)
    rtol = 1e-5 if kernel == "gaussian" and method == "cg" else 1e-9
    np.testing.assert_allclose(float(got.detach()), float(want.detach()), rtol=rtol)
    model.eval(), lik.eval()
    with torch.no_grad():
        f, obs = model(xt), lik(model(xt))
        mean, var = gp(xt, return_variance=True)
        _, var_y = gp(xt, return_variance=True, include_noise=True)
        _, cov = gp(xt, return_covariance=True)
        post, post_y = gp.posterior(xt), gp.posterior(xt, observation_noise=True)
    np.testing.assert_allclose(_np(mean), _np(f.mean), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(_np(cov), _np(f.covariance_matrix), rtol=1e-6, atol=1e-9)
    for mine, theirs in ((post, f), (post_y, obs)):  # (GPyTorch's model(x) and likelihood(model(x)))
        np.testing.assert_allclose(_np(mine.loc), _np(theirs.mean), rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(_np(mine.covariance_matrix), _np(theirs.covariance_matrix), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(_np(var), _np(f.variance), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(_np(var_y), _np(obs.variance), rtol=1e-6, atol=1e-9)
    # the same model built from GPyTorch's directly: kernel, ARD, noise bound, dtype, data and parameters
    built = GPRegression.from_gpytorch(model, precond_rank=N, tol=1e-12, method=method)
    assert built.kernel == kernel and built.ard_num_dims == ard and built.noise.dtype == torch.float64
    assert built.method == method
    with torch.no_grad():
        torch.testing.assert_close(built(xt, return_variance=True), (mean, var), rtol=1e-10, atol=1e-12)
    # and back: this model's parameters into GPyTorch's
    gp.noise, gp.mean_constant = 0.3, -0.7
    model.load_state_dict(gp.state_dict())
    assert float(lik.noise.detach()) == pytest.approx(0.3)
    assert float(model.mean_module.constant.detach()) == pytest.approx(-0.7)


def test_from_gpytorch_refuses_what_it_cannot_be():
    gpytorch = pytest.importorskip("gpytorch")
    x, y, _ = _data(12)

    class Model(gpytorch.models.ExactGP):
        def __init__(self, base, prior=None):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(base, outputscale_prior=prior)

    with pytest.raises(ValueError, match="PeriodicKernel: GPRegression takes"):
        GPRegression.from_gpytorch(Model(gpytorch.kernels.PeriodicKernel()))
    with pytest.raises(ValueError, match=r"MaternKernel \(nu=3\.5\)"):
        bad = gpytorch.kernels.MaternKernel(nu=2.5)
        bad.nu = 3.5
        GPRegression.from_gpytorch(Model(bad))
    with pytest.raises(ValueError, match=r"has shape \(2,.*a batch of GPs"):
        GPRegression.from_gpytorch(Model(gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))))
    with pytest.raises(ValueError, match="active_dims"):
        GPRegression.from_gpytorch(Model(gpytorch.kernels.RBFKernel(active_dims=[0, 1])))
    with pytest.raises(ValueError, match="priors"):
        GPRegression.from_gpytorch(Model(gpytorch.kernels.RBFKernel(), gpytorch.priors.GammaPrior(2.0, 0.5)))
    with pytest.raises(ValueError, match="ExactGP with ConstantMean.*mean_module is a NoneType"):
        GPRegression.from_gpytorch(torch.nn.Linear(2, 2))


def test_an_interval_constraint_is_refused():
    gp = GPRegression(kernel="gaussian")
    sd = gp.state_dict()
    sd["covar_module.raw_outputscale_constraint.upper_bound"] = torch.tensor(10.0)
    with pytest.raises(ValueError, match="raw_outputscale_constraint.upper_bound"):
        gp.load_state_dict(sd)
    assert math.isinf(float(gp.covar_module.raw_outputscale_constraint.upper_bound))  # nothing loaded


def test_data_and_calls_are_checked():
    x, y, xt = _data(6)
    with pytest.raises(ValueError, match="set_train_data"):
        GPRegression()(xt)
    with pytest.raises(ValueError, match="ard_num_dims"):
        GPRegression(x, y, ard_num_dims=2)
    with pytest.raises(ValueError, match="train_y"):
        GPRegression(x, y[:-1])
    with pytest.raises(TypeError, match="train_y"):
        GPRegression(x, y.float())
    with pytest.raises(ValueError, match="finite"):
        GPRegression(x, y * float("nan"))
    with pytest.raises(ValueError, match="kernel"):
        GPRegression(x, y, "rbf")
    gp = GPRegression(x, y).double()
    with pytest.raises(ValueError, match="x_test"):
        gp(xt[:, :2])
    with pytest.raises(TypeError, match="return_variance"):
        gp(xt, return_variance=1)


def test_no_training_points_is_the_prior():
    _, _, xt = _data(11)
    gp = GPRegression(xt[:0], xt[:0, 0], "matern52", outputscale=1.7, mean=0.3).double()
    with torch.no_grad():
        mean, var = gp(xt, return_variance=True)
    torch.testing.assert_close(mean, torch.full((9,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(var, torch.full((9,), 1.7, dtype=torch.float64))
    assert float(gp.marginal_log_likelihood().detach()) == 0.0
    with pytest.raises(ValueError, match="fit needs training data"):
        gp.fit(steps=1)


def test_to_moves_the_data_and_the_state_dict_leaves_it_out():
    x, y, xt = _data(7, dtype=torch.float32)
    gp = GPRegression(x, y, "matern52")
    assert gp.train_x.dtype == torch.float32 and "train_x" not in gp.state_dict()
    gp = gp.double()
    assert gp.train_x.dtype == torch.float64 and gp.noise.dtype == torch.float64
    assert gp(xt.double()).dtype == torch.float64
    assert "N=40, D=3" in repr(gp)


def test_bfloat16_data_as_float32():
    """16-bit training data: the solves run in float32 (kernel_solve); the mean comes in the data's dtype,
    within bfloat16 rounding of the float32 model's."""
    x, y, xt = _data(8, dtype=torch.float32)
    gp = GPRegression(x, y, "matern52", noise=0.05, lengthscale=0.8)
    gp16 = GPRegression(x.bfloat16(), y.bfloat16(), "matern52", noise=0.05, lengthscale=0.8)
    with torch.no_grad():
        m, m16 = gp(xt), gp16(xt.bfloat16())
    assert m16.dtype == torch.bfloat16
    assert float((m16.float() - m).abs().max()) < 0.05 * float(m.abs().max())


def test_deferred_initialisation_and_reset_give_the_build_values():
    """Built on the meta device, then ``to_empty`` and ``reset_parameters`` on each module holding state (as
    FSDP does): the state of a normal build. ``reset_parameters`` on the model undoes a fit."""
    kw = dict(kernel="matern32", ard_num_dims=D, lengthscale=torch.tensor([0.5, 0.7, 2.0]), outputscale=1.7,
              noise=0.03, mean=0.4, noise_lower_bound=1e-3)
    want = GPRegression(**kw).state_dict()
    with torch.device("meta"):
        gp = GPRegression(**kw)
    assert all(p.is_meta for p in gp.parameters()) and "lower_bound=0.001" in repr(gp)
    gp = gp.to_empty(device="cpu")
    for m in gp.modules():
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            m.reset_parameters()
    for key, value in gp.state_dict().items():
        torch.testing.assert_close(value, want[key], msg=key, rtol=0, atol=0)
    x, y, xt = _data(9, dtype=torch.float32)
    gp.set_train_data(x, y)
    gp.fit(steps=3, lr=0.2)
    assert float(gp.outputscale.detach()) != pytest.approx(1.7)
    gp.reset_parameters()
    for key, value in gp.state_dict().items():
        torch.testing.assert_close(value, want[key], msg=key, rtol=0, atol=0)
    assert torch.equal(gp.train_x, x)  # (the data stays)


@pytest.mark.gpu
@METHODS
@pytest.mark.parametrize("kernel", ["gaussian", "matern52"])
def test_gpu_matches_the_references(kernel, method):
    """float32 on CUDA (the flash kernels, or the dense float64 Cholesky path): the posterior mean, variance,
    covariance and distribution, and the exact log-likelihood (rank-N preconditioner), within float32
    conjugate-gradient accuracy of the float64 references; a few fitting steps run and move every parameter."""
    n = 600
    g = torch.Generator().manual_seed(10)
    x = torch.rand(n, D, generator=g) * 3
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(n, generator=g)
    xt = torch.rand(50, D, generator=g) * 3
    gp = GPRegression(x.cuda(), y.cuda(), kernel, ard_num_dims=D, lengthscale=torch.tensor([0.7, 1.1, 0.9]),
                      noise=0.05, mean=0.2, precond_rank=n, method=method).cuda()
    ls, os_, noise, c = _hypers(gp)
    xn, yn, tn = _np(x), _np(y), _np(xt)
    got = float(gp.marginal_log_likelihood(generator=torch.Generator(device="cuda").manual_seed(0)).detach())
    want = ref.gp_log_marginal_likelihood(xn, yn - c, kernel, noise, ls, os_)
    assert abs(got - want) <= 1e-3 * abs(want), (got, want)
    A = ref.kernel_matrix(xn, xn, kernel, ls, os_) + noise * np.eye(n)
    mean_want = c + ref.kernel_matrix(tn, xn, kernel, ls, os_) @ np.linalg.solve(A, yn - c)
    with torch.no_grad():
        mean, var = gp(xt.cuda(), return_variance=True)
        _, cov = gp(xt.cuda(), return_covariance=True)
    np.testing.assert_allclose(_np(mean.cpu()), mean_want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(_np(var.cpu()), ref.gp_posterior_variance(xn, tn, kernel, noise, ls, os_), atol=1e-3)
    ks = ref.kernel_matrix(tn, xn, kernel, ls, os_)
    cov_want = ref.kernel_matrix(tn, tn, kernel, ls, os_) - ks @ np.linalg.solve(A, ks.T)
    np.testing.assert_allclose(_np(cov.cpu()), cov_want, atol=1e-3)
    with torch.no_grad():
        post = gp.posterior(xt.cuda())
    assert post.loc.device.type == "cuda" and post.rsample((2,)).shape == (2, 50)
    np.testing.assert_allclose(_np(post.covariance_matrix.cpu()), cov_want, atol=1e-3)
    before = [p.detach().clone() for p in gp.parameters()]
    losses = gp.fit(steps=3, lr=0.05)
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(gp.parameters(), before))


def test_triton_path_gives_the_torch_paths_model():
    """The flash kernels (the Triton interpreter here) with the module's tensor hyperparameters (a [1, D] ARD
    lengthscale, a [1] noise, a [] outputscale, all requiring grad): the torch path's mean, variance,
    log-likelihood (same probes) and parameter gradients."""
    from opforge.kernels import use_backend

    x, y, xt = _data(13, n=30, dtype=torch.float32)
    out = {}
    for backend in ("torch", "triton"):
        gp = GPRegression(x, y, "gaussian", ard_num_dims=D, lengthscale=torch.tensor([0.8, 1.2, 1.0]), noise=0.05,
                          mean=0.5, num_probes=3, tol=1e-7, method="cg")
        with use_backend(backend):
            mean, var = gp(xt, return_variance=True)
            mll = gp.marginal_log_likelihood(generator=torch.Generator().manual_seed(0))
            mll.backward()
        out[backend] = [mean.detach(), var.detach(), mll.detach()] + [p.grad for p in gp.parameters()]
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)


def test_gradients_in_the_test_points_for_acquisition_functions():
    """Bayesian optimisation differentiates the posterior at the test points with the model frozen: the mean's
    weights then come from the kept solve, and d(mean + variance)/dx_test matches central differences of the
    dense reference."""
    gp, x, y, xt = _model("matern52")
    gp.requires_grad_(False)
    with torch.no_grad():
        gp(xt)  # (the weights, kept)
    xr = xt.clone().requires_grad_()
    mean, var = gp(xr, return_variance=True)
    (mean + var).sum().backward()
    ls, os_, noise, c = _hypers(gp)
    xn, yn = _np(x), _np(y)
    A = ref.kernel_matrix(xn, xn, "matern52", ls, os_) + noise * np.eye(N)
    w = np.linalg.solve(A, yn - c)

    def f(t):
        return (c + ref.kernel_matrix(t, xn, "matern52", ls, os_) @ w
                + ref.gp_posterior_variance(xn, t, "matern52", noise, ls, os_)).sum()

    v = np.random.default_rng(4).standard_normal(xr.shape)
    h = 1e-6
    want = (f(_np(xt) + h * v) - f(_np(xt) - h * v)) / (2 * h)
    np.testing.assert_allclose(float((_np(xr.grad) * v).sum()), want, rtol=1e-6)
