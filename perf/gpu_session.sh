#!/usr/bin/env bash
# One call on a lent GPU: tests, tuning, perf results, GP example, all copied to $OUT.
#
#   bash perf/gpu_session.sh [stage ...]     stages: test check bench tune perf profile example (default: all but profile, in that order)
#
# Peers: carry the wheels of ../shared/gpu-wheels (plus an opt_einsum wheel) in .whl/ to time
# neuraloperator and KeOps in the same run; without them the suites fall back to the labelled
# plain-torch algorithms. Afterwards, on the dev machine: copy $OUT/caches/*.json to autotune/caches/,
# $OUT/results/*.json to perf/results/, run `opforge perf-table --readme README.md` and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/opforge-out}"
mkdir -p "$OUT/caches" "$OUT/results" "$OUT/logs"
stages=("${@:-test check bench tune perf example}")
stages=(${stages[*]})

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The device machine reaches no package index, so nothing is pip-installed: the opforge.* namespace is
# laid out with symlinks (the same mapping as pyproject's package-dir) and put on PYTHONPATH.
src=/tmp/opforge-src/opforge
mkdir -p "$src"
for pkg in kernels autotune reference; do ln -sfn "$PWD/$pkg" "$src/$pkg"; done
export PYTHONPATH=/tmp/opforge-src:${PYTHONPATH:-}
# the tune stage writes $OUT/caches/<tag>.json, the user cache file of this GPU under this folder, so later
# stages of the call (perf, profile, example) dispatch with the configs just tuned
export OPFORGE_CACHE_DIR="$OUT/caches"
tag=$(python3 -c "from opforge.kernels._triton import device_info; print(device_info()['tag'])")
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$OUT/logs/gpu.csv" 2>&1

# The device gets a copy of the working tree whose git metadata can be older than the code: pass the
# commit that runs as OPFORGE_COMMIT=<hash> so results files name it.
# TUNE_DTYPES and PERF_DTYPES pick the dtypes of the tune and perf stages (default float32 bfloat16),
# TUNE_MODES the tuned call kinds (default "fwd fwdbwd": inference and training entries), OPS the ops of
# the tune and perf stages (default all three), CASE_SET their case set (gpu, the default, or main: the
# issues' headline shapes, which fit one 10-minute call), CASES case names within it, TEST_PATHS what the
# test stage runs (default tests). A quick call: CASE_SET=main TUNE_DTYPES=float32 PERF_DTYPES=float32
# OPS="spectral_conv kan" bash perf/gpu_session.sh tune perf
for stage in "${stages[@]}"; do
  case "$stage" in
    test)  # compiled GPU tests, then the CPU tests through the interpreter (Triton reads TRITON_INTERPRET at import)
      TRITON_INTERPRET=0 python3 -m pytest -q -m gpu ${TEST_PATHS:-tests} 2>&1 | tee "$OUT/logs/tests-gpu.log" | tail -15
      # the KAN base path inside the forward kernel (off by default: wrong compiled on an H100, kernels/kan.py)
      OPFORGE_KAN_FUSED_BASE=1 TRITON_INTERPRET=0 python3 -m pytest -q -m gpu tests/test_kan.py -k bspline 2>&1 \
        | tee -a "$OUT/logs/tests-gpu.log" | tail -3
      [ "${TEST_CPU:-1}" = 1 ] && TRITON_INTERPRET=1 python3 -m pytest -q -n 8 -m "not gpu" tests 2>&1 \
        | tee "$OUT/logs/tests-cpu.log" | tail -5 ;;
    check)  # every variant, torch included, against the torch variant in float64 (forward, main shapes)
      timeout 300 python3 perf/check_float64.py --ops spectral_conv kan 2>&1 | tee "$OUT/logs/check.log" | tail -30
      timeout 200 python3 perf/check_float64.py --ops kernel_sum --cases 1e5-d3-r1 2e5-d64-r16 1e4-d256-r1 \
        1e5-d3-r1-matern52 2>&1 | tee -a "$OUT/logs/check.log" | tail -12
      # float32 under torch's TF32 setting: the 'float32-tf32' tolerance row against measured errors
      timeout 200 python3 perf/check_float64.py --tf32 --ops spectral_conv kan --cases 2d-256-b32-c64-m32 \
        2d-94-b20-c32-m16 rbf-b4096-512-g8 chebyshev-b4096-512-d8 fourier-b4096-512-g8 2>&1 \
        | tee -a "$OUT/logs/check.log" | tail -14 ;;
    bench)
      python3 -m opforge.autotune.cli bench 2>&1 | tee "$OUT/logs/bench.log" | tail -40 ;;
    tune)
      for op in ${OPS:-spectral_conv kan kernel_sum}; do
        timeout "${TUNE_LIMIT_S:-300}" python3 -m opforge.autotune.cli tune --op "$op" --dtype ${TUNE_DTYPES:-float32 bfloat16} \
          --mode ${TUNE_MODES:-fwd fwdbwd} --cases "${CASE_SET:-gpu}" ${CASES:+--case $CASES} --out "$OUT/caches/$tag.json" 2>>"$OUT/logs/tune.log" | tail -30
      done ;;
    perf)  # one suite per op, each under its own time limit; records accumulate in one results file
      for op in ${OPS:-spectral_conv kan kernel_sum}; do
        timeout -s INT "${PERF_LIMIT_S:-240}" python3 -m pytest "perf/bench_$op.py" -q -p no:cacheprovider \
          --opforge-results="$OUT/results/$tag.json" \
          --opforge-dtypes="$(echo ${PERF_DTYPES:-float32 bfloat16} | tr ' ' ,)" \
          --opforge-cases="${CASE_SET:-gpu}" --opforge-case-names="$(echo ${CASES:-} | tr ' ' ,)" \
          >>"$OUT/logs/perf.log" 2>&1
        tail -1 "$OUT/logs/perf.log"
      done
      python3 -m opforge.autotune.cli perf-table "$OUT/results/$tag.json" | tail -60 ;;
    profile)  # per-kernel device time of the main shapes: which stage to speed up next
      for spec in "spectral_conv 2d-256-b32-c64-m32 dft_gemm" "spectral_conv 2d-256-b32-c64-m32 fft_mix" \
                  "spectral_conv 2d-256-b32-c64-m32 torch" "spectral_conv 2d-256-b32-c64-m32 dft_gemm --mode fwd" \
                  "kan rbf-b4096-512-g8 fused" "kan chebyshev-b4096-512-d8 fused" \
                  "kan chebyshev-b4096-512-d8 fused --tf32" "kan chebyshev-b4096-512-d8 torch" \
                  "kan bspline-b4096-512-g8 fused" "kan fourier-b4096-512-g8 fused" \
                  "kernel_sum 2e5-d64-r16 flash" "kernel_sum 1e6-d3-r1 flash --mode fwd"; do
        timeout 120 python3 perf/profile_op.py $spec 2>&1 | grep -v USDT | tee -a "$OUT/logs/profile.log" | head -10
      done ;;
    example)
      python3 perf/gp_example.py --n 100000 2>&1 | tee "$OUT/logs/gp_example.log"
      python3 perf/first_call.py 2>&1 | tee "$OUT/logs/first_call.log" ;;
    *) echo "unknown stage $stage (test check bench tune perf profile example)"; exit 2 ;;
  esac
done
