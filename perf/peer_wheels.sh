#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the peer libraries' wheels for a GPU call (`carry: [".whl"]`), which
# perf/gpu_session.sh installs into /tmp/site there: the wheels of ../shared/gpu-wheels (neuraloperator and
# its dependencies, pykeops + keopscore, dcls) plus the two pure-Python wheels they need that the GPU image
# lacks and cannot download (it reaches no package index): opt_einsum (tensorly-torch's contractions) and
# pybind11 (KeOps builds its Python binder with it, on a GPU as on a CPU), and GPyTorch with linear_operator,
# jaxtyping and wadler_lindig (perf/gp_peer.py).
#
#   bash perf/peer_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
cp ../shared/gpu-wheels/*.whl .whl/
python -m pip download -q --no-deps --only-binary=:all: --dest .whl opt_einsum pybind11
# GPyTorch for perf/gp_peer.py (the GP comparison): it and its three pure-Python dependencies the GPU image
# lacks (its scikit-learn and scipy are imported only by features the comparison does not use; mpmath comes
# with torch's sympy)
python -m pip download -q --no-deps --only-binary=:all: --dest .whl gpytorch==1.15.2 linear_operator==0.6.1 \
  jaxtyping==0.3.11 wadler_lindig==0.1.8
ls .whl
