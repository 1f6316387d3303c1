#!/usr/bin/env bash
# The static counts in perf/results/static/: every main case's Triton variants compiled for an H100 (sm_90)
# by perf/inspect_kernels.py, forward + backward (and the forward alone where inference has its own kernels).
# Needs Triton's ptxas and cuobjdump (any Triton wheel ships them; no GPU). Set PYTHONPATH to a Triton 3.6
# install to count what the GPU image (Triton 3.6) compiles. Then: opforge perf-table --readme README.md
set -euo pipefail
cd "$(dirname "$0")"
OUT="${1:-results/static/sm90_triton$(python -c 'import triton; print(".".join(triton.__version__.split(".")[:2]))').json}"
run() { python inspect_kernels.py "$@" --json "$OUT" >/dev/null && echo "counted: $*"; }
run spectral_conv 2d-256-b32-c64-m32 dft_gemm --mode fwdbwd
run spectral_conv 2d-256-b32-c64-m32 fft_mix --mode fwdbwd
for c in bspline-b4096-512-g8 rbf-b4096-512-g8 chebyshev-b4096-512-d8 fourier-b4096-512-g8; do
  run kan "$c" fused --mode fwdbwd
  run kan "$c" staged --mode fwdbwd
done
run kan bspline-b100-1000-g5 fused --mode fwdbwd  # in and out not multiples of 16, a small batch (SPLIT_I)
for c in 1e6-d3-r1 2e5-d64-r1 2e5-d64-r16 1e4-d256-r1; do
  run kernel_sum "$c" flash --mode fwdbwd
done
echo "wrote perf/$OUT"
