"""opforge's ``GPRegression`` against GPyTorch's exact GP, the library GP users have, on the same data with the
same parameters, timed in the same run.

    python perf/gp_peer.py [--n 200 500 800 1600] [--kernel matern52] [--t 1000] [--device cuda] [--repeat 3]
                           [--json FILE]

For each N (points uniform in [0, 1]^3, y = sin(3 (x1 + x2 + x3)) + 0.1 noise) GPyTorch's
``ExactGP(ConstantMean, ScaleKernel(base), GaussianLikelihood)`` is built with lengthscale 0.3, outputscale 1,
noise 0.01, and ``GPRegression.from_gpytorch`` takes it (kernel, data, parameters). Each library runs with its
own default settings. GPyTorch factors the matrix up to 800 points (its ``max_cholesky_size``), in the data's
float32, and above runs preconditioned conjugate gradients with stochastic log-determinants and its looser
defaults (training CG tolerance 1, 10 probes, a rank-15 preconditioner). opforge (``method="auto"``) factors
it in float64 up to 800 points on a GPU and 4096 on a CPU, and above runs conjugate gradients with tol 1e-6,
16 probes and rank 64. So the accuracy records say what each one's answers are worth. Per N, the median of
``--repeat`` calls after one warm-up, in milliseconds:

* ``mll+grad``: the training step, -log p(y) / N (GPyTorch's ``ExactMarginalLogLikelihood``) and its
  gradient in every parameter;
* ``predict-cold@T``: the posterior mean and variance at T test points just after a parameter change
  (GPyTorch's ``model.train(); model.eval()`` clears its prediction caches; a write to opforge's noise makes its kept
  weights and factor stale), under ``torch.no_grad()``;
* ``predict-warm@T``: the same call repeated with nothing changed (the caches of both kept), a Bayesian-
  optimisation loop's call.

The speedup is GPyTorch's time over opforge's. The accuracy records (call ``accuracy``, up to ``--ref-max``
points) give each library's error against the exact answer, the NumPy float64 reference
(``opforge.reference.kernel_sum``: the dense matrix, ``numpy.linalg``): the log-likelihood's relative error,
and the largest errors of the means (relative to the largest |mean|) and of the variances (relative to the
largest variance). ``--json FILE`` writes every record with the device, kernel, N, torch and GPyTorch
versions, the commit and this command; ``perf/results/gp/`` keeps the committed ones, which
``opforge perf-table`` renders.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from opforge.autotune.perf import git_commit
from opforge.autotune.timing import wall_ms
from opforge.kernels import GPRegression

BASES = {"gaussian": ("RBFKernel", {}), "laplacian": ("MaternKernel", {"nu": 0.5}),
         "matern32": ("MaternKernel", {"nu": 1.5}), "matern52": ("MaternKernel", {"nu": 2.5})}


def gpytorch_model(gpytorch, x, y, kernel: str):
    """GPyTorch's standard exact GP on (x, y) with lengthscale 0.3, outputscale 1 and noise 0.01."""
    name, kw = BASES[kernel]

    class ExactGP(gpytorch.models.ExactGP):
        def __init__(self, lik):
            super().__init__(x, y, lik)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(getattr(gpytorch.kernels, name)(**kw))

        def forward(self, t):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(t), self.covar_module(t))

    model = ExactGP(gpytorch.likelihoods.GaussianLikelihood()).to(x.device)
    model.covar_module.base_kernel.lengthscale = 0.3
    model.covar_module.outputscale = 1.0
    model.likelihood.noise = 0.01
    return model


def compare(n: int, kernel: str, t: int, device: str, repeat: int, gen: torch.Generator,
            ref_max: int = 4096) -> list[dict]:
    """The records of one N: a timing record per call and, for N <= ``ref_max``, one accuracy record."""
    import gpytorch

    x = torch.rand(n, 3, generator=gen)
    y = (torch.sin(3 * x.sum(-1)) + 0.1 * torch.randn(n, generator=gen)).to(device)
    x, xt = x.to(device), torch.rand(t, 3, generator=gen).to(device)
    model = gpytorch_model(gpytorch, x, y, kernel)
    lik = model.likelihood
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    gp = GPRegression.from_gpytorch(model)

    def theirs_train():
        model.train(), lik.train()
        model.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    def ours_train():
        gp.zero_grad()
        loss = -gp.marginal_log_likelihood() / n
        loss.backward()
        return loss

    def theirs_predict(cold: bool):
        if cold:
            model.train(), lik.train()
        model.eval(), lik.eval()
        with torch.no_grad():
            post = model(xt)
            return post.mean, post.variance

    def ours_predict(cold: bool):
        if cold:
            gp.noise = 0.01  # (an in-place write: the kept weights and factor are stale)
        with torch.no_grad():
            return gp(xt, return_variance=True)

    records = []
    calls = {"mll+grad": (theirs_train, ours_train),
             f"predict-cold@{t}": (lambda: theirs_predict(True), lambda: ours_predict(True)),
             f"predict-warm@{t}": (lambda: theirs_predict(False), lambda: ours_predict(False))}
    for name, (theirs, ours) in calls.items():
        ms_theirs, ms_ours = wall_ms(theirs, device, repeat), wall_ms(ours, device, repeat)
        records.append(dict(n=n, call=name, gpytorch_ms=round(ms_theirs, 3), opforge_ms=round(ms_ours, 3),
                            speedup=round(ms_theirs / ms_ours, 2)))
    l_theirs, l_ours = float(theirs_train().detach()), float(ours_train().detach())
    (m1, v1), (m2, v2) = theirs_predict(True), ours_predict(True)
    if n > ref_max:
        return records
    want = _reference(x, y, xt, kernel, float(model.mean_module.constant.detach()))
    got = {"gpytorch": (l_theirs, m1, v1), "opforge": (l_ours, m2, v2)}
    errors = {}
    for lib, (mll_n, mean, var) in got.items():
        errors[f"{lib}_mll_error"] = abs(-mll_n - want[0]) / abs(want[0])
        for name, t, w in (("mean", mean, want[1]), ("variance", var, want[2])):
            diff = np.abs(t.detach().double().cpu().numpy() - w)
            errors[f"{lib}_{name}_error"] = float(diff.max() / np.abs(w).max())
    records.append(dict(n=n, call="accuracy", **errors))
    return records


def _reference(x, y, xt, kernel: str, c: float) -> tuple:
    """(log p(y) / N, posterior mean, posterior variance of f) in NumPy float64 from the dense matrix, with
    ``gpytorch_model``'s parameters."""
    from opforge.reference import kernel_sum as ref

    xn, yn, tn = (t.detach().double().cpu().numpy() for t in (x, y, xt))
    A = ref.kernel_matrix(xn, xn, kernel, 0.3, 1.0) + 0.01 * np.eye(len(xn))
    ks = ref.kernel_matrix(tn, xn, kernel, 0.3, 1.0)
    r = yn - c
    mll = -0.5 * r @ np.linalg.solve(A, r) - 0.5 * np.linalg.slogdet(A)[1] - 0.5 * len(xn) * np.log(2 * np.pi)
    mean = c + ks @ np.linalg.solve(A, r)
    var = 1.0 - np.einsum("ij,ji->i", ks, np.linalg.solve(A, ks.T))
    return mll / len(xn), mean, var


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 500, 800, 1600])
    ap.add_argument("--kernel", choices=list(BASES), default="matern52")
    ap.add_argument("--t", type=int, default=1000, help="test points of the predictions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ref-max", type=int, default=4096, help="largest N checked against the float64 reference")
    ap.add_argument("--json", type=Path, help="also write the records as JSON to this file")
    args = ap.parse_args(argv)
    if min(args.n) < 1 or args.repeat < 1 or args.t < 1:
        ap.error("--n, --t and --repeat must be positive")
    try:
        import gpytorch
    except ImportError as exc:
        print(f"gp_peer: GPyTorch is not importable here ({exc}); pip install gpytorch, or on the GPU machine "
              f"carry .whl (bash perf/peer_wheels.sh)", file=sys.stderr)
        return 2
    dev = args.device
    device_name = (torch.cuda.get_device_name() if dev.startswith("cuda") else
                   f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
    command = "python perf/gp_peer.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    common = dict(device=device_name, kernel=args.kernel, torch=torch.__version__, gpytorch=gpytorch.__version__,
                  commit=git_commit(), repeat=args.repeat, command=command.strip())
    print(f"device {device_name}, kernel {args.kernel}, torch {torch.__version__}, gpytorch {gpytorch.__version__}")
    print(f"{'N':>6} {'call':<18} {'gpytorch ms':>12} {'opforge ms':>11} {'speedup':>8}")
    gen = torch.Generator().manual_seed(0)
    records = []
    for n in args.n:
        for r in compare(n, args.kernel, args.t, dev, args.repeat, gen, args.ref_max):
            if r["call"] == "accuracy":
                print(f"{n:>6} {'errors':<18} " + ", ".join(
                    f"{q} {r[f'gpytorch_{q}_error']:.1e} vs {r[f'opforge_{q}_error']:.1e}"
                    for q in ("mll", "mean", "variance")) + " (GPyTorch vs opforge, relative)")
            else:
                print(f"{n:>6} {r['call']:<18} {r['gpytorch_ms']:>12.2f} {r['opforge_ms']:>11.2f} "
                      f"{r['speedup']:>7.2f}x")
            records.append(dict(r, **common))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
