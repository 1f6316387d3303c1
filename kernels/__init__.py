"""opforge's ops: Triton kernels, torch fallbacks, autograd and modules.

Public API::

    from opforge.kernels import spectral_conv2d, SpectralConv
    from opforge.kernels import registered_ops, use_backend

``registered_ops()`` lists ``{op: [variants]}``; ``use_backend("torch")`` (or
``OPFORGE_BACKEND=torch|triton|auto``) overrides dispatch, and
``use_backend("triton", spectral_conv="dft_gemm")`` pins a variant. ``HAS_TRITON`` says whether the Triton
variants exist here; where not, ``TRITON_MISSING`` says why (not installed, or older than the kernels need).
"""
from ._registry import BACKENDS, current_backend, get_op, registered_ops, use_backend
from ._triton import HAS_TRITON, TRITON_MISSING, interpreter_enabled
from .spectral_conv import (FactorizedWeight, SpectralConv, spectral_conv, spectral_conv1d, spectral_conv2d,
                            spectral_conv3d)

__all__ = [
    "BACKENDS", "FactorizedWeight", "HAS_TRITON", "SpectralConv", "TRITON_MISSING", "current_backend", "get_op",
    "interpreter_enabled", "registered_ops", "spectral_conv", "spectral_conv1d", "spectral_conv2d", "spectral_conv3d",
    "use_backend",
]
from .kernel_sum import (GPYTORCH_KERNELS, KERNELS, SOLVE_METHODS, GPRegression, KernelOperator,  # noqa: E402
                         gp_marginal_log_likelihood, gp_posterior_covariance, gp_posterior_mean,
                         gp_posterior_variance, kernel_matvec, kernel_solve)

__all__ += ["GPRegression", "GPYTORCH_KERNELS", "KERNELS", "KernelOperator", "SOLVE_METHODS",
            "gp_marginal_log_likelihood",
            "gp_posterior_covariance", "gp_posterior_mean", "gp_posterior_variance",
            "kernel_matvec", "kernel_solve"]
from .kan import KAN, BASES, ChebyKANLayer, FastKAN, FastKANLayer, FourierKANLayer, KANLinear, kan_linear  # noqa: E402

__all__ += ["BASES", "ChebyKANLayer", "FastKAN", "FastKANLayer", "FourierKANLayer", "KAN", "KANLinear", "kan_linear"]
