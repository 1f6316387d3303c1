"""Every public function, module and method, called with one argument replaced by a wrong value (None, text,
a boolean, NaN, inf, -1, 0, a list, an empty tuple, integer, empty, reshaped, transposed, meta or non-finite
tensors): it either works (float64 for float32, say) or raises ``ValueError`` / ``TypeError`` naming what is
wrong, never an AttributeError, IndexError, ZeroDivisionError or an error from inside torch (lstsq's internal
assert, CG's in-place broadcast, an FFT of no points), which is what this sweep found before those calls
checked their arguments. Boolean flags are not given tensors (``bool()`` of a tensor is torch's to refuse).
"""
import warnings

import pytest
import torch

import opforge.kernels as K

ALLOWED = (ValueError, TypeError, NotImplementedError)
FLAGS = {"return_info", "enable_standalone_scale_spline", "use_base_update", "use_layernorm", "addbias",
         "smooth_initialization", "bias_flag", "separable", "update_grid", "include_noise",
         "return_variance", "return_covariance", "observation_noise"}


def _bad_values(v):
    out = [None, "a", True, float("nan"), float("inf"), -1, 0, [1.0, 2.0], (), torch.tensor(float("nan")),
           torch.ones(2, dtype=torch.int64), torch.ones(3, 3, dtype=torch.complex64), torch.empty(0),
           torch.ones(1, device="meta")]
    if isinstance(v, torch.Tensor):
        out += [v.to(torch.int32), v[..., :0], v[:0], v.unsqueeze(0).unsqueeze(0), v.reshape(-1), v.double(),
                v.half(), v.transpose(0, -1) if v.dim() > 1 else v, v.to("meta"), v * float("nan"),
                v * float("inf")]
    return out


def _calls():
    x2, w = torch.randn(5, 3), torch.randn(2, 3, 6)
    grid = torch.linspace(-1, 1, 10).expand(3, 10).contiguous()
    layer, conv, op = K.KANLinear(3, 2), K.SpectralConv(3, 2, (6, 6)), K.KernelOperator(torch.randn(6, 3), noise=0.1)
    gpr = K.GPRegression(torch.randn(6, 3), torch.randn(6), "matern32", num_probes=2, precond_rank=4)
    return {
        "kan_linear-bspline": (K.kan_linear, dict(x=x2, weight=w, basis="bspline", base_weight=torch.randn(2, 3),
                                                   bias=torch.randn(2), grid=grid, spline_order=3)),
        "kan_linear-rbf": (K.kan_linear, dict(x=x2, weight=w, basis="rbf", centers=torch.linspace(-1, 1, 6),
                                              width=0.4)),
        "spectral_conv": (K.spectral_conv, dict(x=torch.randn(2, 3, 12),
                                                weight=torch.randn(3, 4, 5, dtype=torch.complex64),
                                                bias=torch.randn(4), output_shape=(10,), fft_norm="forward")),
        "kernel_matvec": (K.kernel_matvec, dict(x=torch.randn(5, 3), y=torch.randn(6, 3), b=torch.randn(6, 2),
                                                kernel="matern52", lengthscale=torch.ones(3), outputscale=2.0)),
        "kernel_solve": (K.kernel_solve, dict(x=torch.randn(6, 3), y=torch.randn(6), kernel="gaussian", noise=0.1,
                                              lengthscale=1.0, outputscale=1.0, tol=1e-6, max_iter=50,
                                              return_info=False, precond_rank=4, x0=torch.zeros(6),
                                              method="auto")),
        "gp_marginal_log_likelihood": (K.gp_marginal_log_likelihood,
                                       dict(x=torch.randn(6, 3), y=torch.randn(6), kernel="matern32", noise=0.1,
                                            lengthscale=1.0, outputscale=1.0, num_probes=3, tol=1e-6, max_iter=50,
                                            precond_rank=4, generator=torch.Generator().manual_seed(0),
                                            return_info=False, method="auto")),
        "gp_posterior_variance": (K.gp_posterior_variance,
                                  dict(x_train=torch.randn(6, 3), x_test=torch.randn(2, 3), kernel="laplacian",
                                       noise=0.1, lengthscale=1.0, outputscale=1.0, tol=1e-6, max_iter=50,
                                       precond_rank=4, include_noise=False, method="auto")),
        "gp_posterior_covariance": (K.gp_posterior_covariance,
                                    dict(x_train=torch.randn(6, 3), x_test=torch.randn(2, 3), kernel="matern52",
                                         noise=0.1, lengthscale=1.0, outputscale=1.0, tol=1e-6, max_iter=50,
                                         precond_rank=4, include_noise=False, method="auto")),
        "gp_posterior_mean": (K.gp_posterior_mean, dict(x_train=torch.randn(6, 3), y_train=torch.randn(6),
                                                        x_test=torch.randn(2, 3), noise=0.1, lengthscale=1.0,
                                                        method="auto")),
        "GPRegression": (lambda **kw: K.GPRegression(**kw)(torch.randn(2, 3)),
                         dict(train_x=torch.randn(6, 3), train_y=torch.randn(6), kernel="matern52", ard_num_dims=3,
                              lengthscale=torch.ones(3), outputscale=1.0, noise=0.1, mean=0.0,
                              noise_lower_bound=1e-4, num_probes=2, tol=1e-6, max_iter=50, precond_rank=4,
                              method="auto")),
        "GPRegression.forward": (lambda **kw: gpr(**kw), dict(x_test=torch.randn(2, 3), return_variance=True,
                                                              include_noise=False)),
        "GPRegression.forward-covariance": (lambda **kw: gpr(**kw), dict(x_test=torch.randn(2, 3),
                                                                         return_covariance=True, include_noise=True)),
        "GPRegression.posterior": (lambda **kw: gpr.posterior(**kw), dict(x_test=torch.randn(2, 3),
                                                                          observation_noise=True, jitter=1e-6)),
        "GPRegression.condition_on_observations": (lambda **kw: gpr.condition_on_observations(**kw)(
            torch.randn(2, 3)), dict(x=torch.randn(2, 3), y=torch.randn(2))),
        "GPRegression.set_train_data": (lambda **kw: K.GPRegression().set_train_data(**kw),
                                        dict(x=torch.randn(6, 3), y=torch.randn(6))),
        "GPRegression.fit": (lambda **kw: K.GPRegression(torch.randn(6, 3), torch.randn(6), num_probes=2).fit(**kw),
                             dict(steps=2, lr=0.1, generator=torch.Generator().manual_seed(0), optimizer="adam")),
        "GPRegression.fit-lbfgs": (lambda **kw: K.GPRegression(torch.randn(6, 3), torch.randn(6), num_probes=2).fit(
            **kw), dict(steps=2, lr=1.0, generator=torch.Generator().manual_seed(0), optimizer="lbfgs")),
        "GPRegression.marginal_log_likelihood": (lambda **kw: gpr.marginal_log_likelihood(**kw),
                                                 dict(generator=torch.Generator().manual_seed(0), return_info=False)),
        "GPRegression.lengthscale=": (lambda v: setattr(K.GPRegression(ard_num_dims=3), "lengthscale", v),
                                      dict(v=torch.ones(3))),
        "GPRegression.noise=": (lambda v: setattr(K.GPRegression(), "noise", v), dict(v=0.1)),
        "GPRegression.mean_constant=": (lambda v: setattr(K.GPRegression(), "mean_constant", v), dict(v=0.5)),
        "KernelOperator": (lambda **kw: K.KernelOperator(**kw) @ torch.randn(6),
                           dict(x=torch.randn(6, 3), kernel="gaussian", lengthscale=1.0, outputscale=1.0, noise=0.1)),
        "KernelOperator@": (lambda b: op @ b, dict(b=torch.randn(6, 2))),
        "@KernelOperator": (lambda v: v @ op, dict(v=torch.randn(2, 6))),
        "KANLinear": (lambda **kw: K.KANLinear(**kw)(torch.randn(4, 3)),
                      dict(in_features=3, out_features=2, grid_size=5, spline_order=3, scale_noise=0.1,
                           scale_base=1.0, scale_spline=1.0, enable_standalone_scale_spline=True, grid_eps=0.02,
                           grid_range=(-1, 1))),
        "KANLinear.forward": (lambda x: layer(x), dict(x=torch.randn(5, 3))),
        "KANLinear.update_grid": (lambda **kw: K.KANLinear(3, 2).update_grid(**kw),
                                  dict(x=torch.randn(20, 3), margin=0.01)),
        "KANLinear.b_splines": (lambda x: layer.b_splines(x), dict(x=torch.randn(5, 3))),
        "KANLinear.curve2coeff": (lambda **kw: layer.curve2coeff(**kw), dict(x=torch.randn(20, 3),
                                                                              y=torch.randn(20, 3, 2))),
        "KAN": (lambda **kw: K.KAN(**kw)(torch.randn(4, 3)), dict(layers_hidden=[3, 4, 2], grid_size=5)),
        "FastKANLayer": (lambda **kw: K.FastKANLayer(**kw)(torch.randn(4, 3)),
                         dict(input_dim=3, output_dim=2, grid_min=-2.0, grid_max=2.0, num_grids=8,
                              use_base_update=True, use_layernorm=True, spline_weight_init_scale=0.1)),
        "FastKAN": (lambda **kw: K.FastKAN(**kw)(torch.randn(4, 3)), dict(layers_hidden=[3, 4, 2], num_grids=8)),
        "ChebyKANLayer": (lambda **kw: K.ChebyKANLayer(**kw)(torch.randn(4, 3)),
                          dict(input_dim=3, output_dim=2, degree=4)),
        "ChebyKANLayer.forward": (lambda x: K.ChebyKANLayer(3, 2, 3)(x), dict(x=torch.randn(5, 3))),
        "FourierKANLayer": (lambda **kw: K.FourierKANLayer(**kw)(torch.randn(4, 3)),
                            dict(inputdim=3, outdim=2, gridsize=4, addbias=True, smooth_initialization=False)),
        "SpectralConv": (lambda **kw: K.SpectralConv(**kw)(torch.randn(2, 3, 16, 16)),
                         dict(in_channels=3, out_channels=2, n_modes=(6, 6), fft_norm="forward", init_std="auto",
                              resolution_scaling_factor=None, max_n_modes=None, separable=False,
                              factorization=None, rank=0.5, implementation="reconstructed")),
        "SpectralConv.forward": (lambda **kw: conv(**kw), dict(x=torch.randn(2, 3, 16, 16), output_shape=(12, 12))),
        "SpectralConv.transform": (lambda **kw: conv.transform(**kw),
                                   dict(x=torch.randn(2, 3, 16, 16), output_shape=(12, 12))),
        "SpectralConv.n_modes": (lambda v: setattr(K.SpectralConv(3, 2, (6, 6)), "n_modes", v), dict(v=(4, 4))),
        "FactorizedWeight-tucker": (lambda **kw: K.FactorizedWeight(**kw).to_tensor(),
                                    dict(kind="tucker", shape=(3, 2, 6, 4), rank=0.5, fixed_rank_modes=None)),
        "FactorizedWeight-cp": (lambda **kw: K.FactorizedWeight(**kw).to_tensor(),
                                dict(kind="cp", shape=(3, 2, 6, 4), rank=3)),
        "FactorizedWeight-tt": (lambda **kw: K.FactorizedWeight(**kw).to_tensor(),
                                dict(kind="tt", shape=(3, 2, 6, 4), rank=(1, 2, 2, 2, 1))),
        "SpectralConv.from_neuraloperator": (lambda layer: K.SpectralConv.from_neuraloperator(layer),
                                             dict(layer=K.SpectralConv(3, 2, (6, 6)))),
    }


CALLS = _calls()
# the solvers' two paths: "auto" takes the Cholesky one at these sizes, so each solver again on conjugate gradients
for _name in ("kernel_solve", "gp_marginal_log_likelihood", "gp_posterior_variance", "gp_posterior_covariance",
              "gp_posterior_mean", "GPRegression"):
    CALLS[_name + "-cg"] = (CALLS[_name][0], dict(CALLS[_name][1], method="cg"))


def _gpytorch_model():
    """A GPyTorch ExactGP for GPRegression.from_gpytorch, where GPyTorch is installed (.ci/run installs it)."""
    import gpytorch

    x = torch.randn(6, 3)

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, torch.randn(6), gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=1.5))

    return Model()


try:
    CALLS["GPRegression.from_gpytorch"] = (lambda **kw: K.GPRegression.from_gpytorch(**kw)(torch.randn(2, 3)),
                                           dict(model=_gpytorch_model(), precond_rank=4, num_probes=2))
except Exception:  # noqa: BLE001 (GPyTorch missing, or failing to import here: its own parity test says which)
    pass


@pytest.mark.parametrize("name", list(CALLS))
def test_a_wrong_argument_is_a_value_or_type_error(name):
    fn, kw = CALLS[name]
    fn(**kw)  # the call as given works
    odd = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arg, good in kw.items():
            for bad in _bad_values(good):
                if arg in FLAGS and isinstance(bad, torch.Tensor):
                    continue
                try:
                    fn(**dict(kw, **{arg: bad}))
                except ALLOWED:
                    pass
                except Exception as exc:  # noqa: BLE001 (what this test looks for)
                    odd.append(f"{arg}={bad!r:.40}: {type(exc).__name__}: {str(exc)[:100]}")
    assert not odd, "\n".join(odd)


# (a dense layer ignores rank, as neuraloperator's does; the factorized ones check it)
IGNORED = {("SpectralConv", "rank")}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_boolean_is_not_read_as_a_number(name):
    """``True`` is 1 to Python: given for a size, a count, a scale or a mode list's entry (not a flag), it was
    taken as 1 (``n_modes=(True, 4)``, ``precond_rank=True``, ``grid_range=(True, 2)``,
    ``resolution_scaling_factor=[True, 2]``). Each such call now raises."""
    fn, kw = CALLS[name]
    taken = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arg, good in kw.items():
            if arg in FLAGS or (name, arg) in IGNORED:
                continue
            bads = [True, False]
            if isinstance(good, (tuple, list)) and good and not isinstance(good[0], torch.Tensor):
                bads.append(type(good)([True, *good[1:]]))
            for bad in bads:
                try:
                    fn(**dict(kw, **{arg: bad}))
                except ALLOWED:
                    continue
                taken.append(f"{arg}={bad!r}")
    assert not taken, taken
