#!/usr/bin/env bash
# One call on a lent GPU: tests, tuning, perf results, GP example, all copied to $OUT.
#
#   bash perf/gpu_session.sh [stage ...]     stages: test check bench tune perf profile example (default: all but profile, in that order)
#
# What comes back from $OUT is at most 8 files, so everything goes to three: $OUT/session.log (every
# stage's output, each under a "== stage" header with the seconds elapsed), $OUT/caches/<gpu>.json (the
# tuned entries) and $OUT/results/<gpu>.json (the perf records).
#
# BUDGET_S (default 560) bounds the whole call, so that one 600-second command returns what it made: each
# timed stage gets at most what is left of it less a 15-second reserve, and a stage with under 30 seconds
# left is skipped and says so in the log. A lent machine now has 15 device-minutes a session, starts
# included, which fits one such call; the call for it (the stages in the order that matters most when
# time runs out: compiled correctness first, then tuning, then headline timings at the tuned configs):
#
#   OPFORGE_COMMIT=<hash> CASE_SET=main PERF_DTYPES=float32 TUNE_DTYPES=float32 TUNE_MODES=fwdbwd \
#     TUNE_MODES_kernel_sum=fwd TEST_CPU=0 TEST_FUSED_BASE=0 TEST_LIMIT_S=150 TUNE_LIMIT_S=90 PERF_LIMIT_S=110 \
#     bash perf/gpu_session.sh test tune perf
#
# (the GPU tests within 150 s, the 2D 256^2 spectral checks included, each op's main-case tuning within 90 s,
# kernel sums for the forward call their targets name, each op's main-case perf suite within 110 s with what
# is left). Run with TEST_LIMIT_S=120 TUNE_LIMIT_S=100 PERF_LIMIT_S=90 on an H200 at commit bde7c61
# (BUDGET_S=565), it ended at 486 s: the tests took 83 s, the tuning 218 s (the kernel-sum training
# call at 1e6 points cut at 100 s after 6 of 14 configs, about 2 s a call), the suites 175 s (the spectral one
# cut at its 90 s). The tuner compiles every config's kernels in worker processes on the host's CPU
# cores before it times them (autotune/precompile.py): there, 20 spectral configs in 31 s and 84 KAN ones in
# about 30 s with 15 workers, after which 91 of the 100 timed configs' first calls took 0.00-0.04 s (found precompiled)
# and a few 0.37-1.7 s (the process's first launch, a case's first config; a 1e6-point call itself runs 0.4 s).
# With device time left on the still-warm machine, a second call: OPS=<op> ... bash perf/gpu_session.sh tune perf.
#
# Peers: `bash perf/peer_wheels.sh` here fills .whl/ (the wheels of ../shared/gpu-wheels plus opt_einsum and
# pybind11, which KeOps builds its binder with, and GPyTorch's four pure-Python wheels); name .whl in the
# call's carry to time neuraloperator, KeOps and GPyTorch in the same run. Without them the suites fall back
# to the labelled plain-torch algorithms.
# Afterwards, on the dev machine: copy $OUT/caches/*.json to autotune/caches/, $OUT/results/*.json to
# perf/results/, $OUT/solvers/*.json and $OUT/gp/*.json (the example stage's solver paths and GPyTorch
# comparison) to perf/results/solvers/ and perf/results/gp/, run
# `opforge perf-table --readme README.md` and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/opforge-out}"
mkdir -p "$OUT/caches" "$OUT/results" "$OUT/solvers" "$OUT/gp"
LOG="$OUT/session.log"
BUDGET_S="${BUDGET_S:-560}"
# SCRATCH (default /tmp) holds the peers installed from .whl/ and the opforge namespace of symlinks
SCRATCH="${SCRATCH:-/tmp}"
stages=("${@:-test check bench tune perf example}")
stages=(${stages[*]})

# seconds a stage may run: its own limit, or what is left of BUDGET_S less a reserve, whichever is less
limit() {
  local left=$((BUDGET_S - SECONDS - 15))
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# fits <s>: is anything left for a stage (else it is skipped, and the log says so)
fits() {
  if [ "$(limit "$1")" -lt 30 ]; then
    echo "== skipped: $stage (${SECONDS}s of ${BUDGET_S}s spent)" | tee -a "$LOG"; return 1
  fi
}
# timed <seconds> <command...>: the command under limit(<seconds>), its output appended to the log and the
# last TAIL lines shown; SIGINT at the limit (pytest then reports and writes what it has), KILL 10 s later
timed() {
  local s; s=$(limit "$1"); shift
  if [ "$s" -lt 30 ]; then echo "-- skipped (budget): $*" | tee -a "$LOG"; return 0; fi
  timeout -s INT -k 10 "$s" "$@" 2>&1 | tee -a "$LOG" | tail -"${TAIL:-12}"
}

# xdist <n>: pytest's options for n worker processes where pytest-xdist is installed (the GPU image has it)
xdist() { [ "$1" -gt 0 ] && python3 -c "import xdist" 2>/dev/null && echo "-n $1"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  pipt() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" "$@"; }
  # all at once; where one wheel does not fit this Python (pip then installs none), one by one, so the
  # others still install and the log names the misfit
  export PIP_ROOT_USER_ACTION=ignore
  pipt .whl/*.whl 2>/dev/null || for w in .whl/*.whl; do
    pipt "$w" >/dev/null 2>&1 || echo "-- peer wheel not installed (not for this Python or platform): $w" >>"$LOG"
  done
  export PYTHONPATH="$SCRATCH/site:${PYTHONPATH:-}"
fi
# The device machine reaches no package index, so nothing is pip-installed: the opforge.* namespace is
# laid out with symlinks (the same mapping as pyproject's package-dir) and put on PYTHONPATH.
src="$SCRATCH/opforge-src/opforge"
mkdir -p "$src"
for pkg in kernels autotune reference; do ln -sfn "$PWD/$pkg" "$src/$pkg"; done
export PYTHONPATH="$SCRATCH/opforge-src:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
# the tune stage writes $OUT/caches/<tag>.json, the user cache file of this GPU under this folder, so later
# stages of the call (perf, profile, example) dispatch with the configs just tuned
export OPFORGE_CACHE_DIR="$OUT/caches"
tag=$(python3 -c "from opforge.kernels._triton import device_info; print(device_info()['tag'])")
{ echo "== $tag, commit ${OPFORGE_COMMIT:-?}, stages: ${stages[*]}, budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1; } >>"$LOG"

# The device gets a copy of the working tree whose git metadata can be older than the code: pass the
# commit that runs as OPFORGE_COMMIT=<hash> so results files name it.
# TUNE_DTYPES and PERF_DTYPES pick the dtypes of the tune and perf stages (default float32 bfloat16),
# TUNE_MODES the tuned call kinds (default "fwd fwdbwd": inference and training entries; TUNE_MODES_<op> for
# one op), TUNE_ARGS more `opforge tune` options (--interpret: the stage on a CPU, tests/test_cli.py), OPS the ops of
# the tune and perf stages (default all three), CASE_SET their case set (gpu, the default, or main: the
# issues' headline shapes), CASES case names within it, TEST_PATHS what the test stage runs (default: every
# test file with GPU tests, the ops' own first), TEST_WORKERS the test processes sharing the GPU (default 8),
# TEST_FUSED_BASE=0 skips the in-kernel KAN base-path test.
for stage in "${stages[@]}"; do
  echo "== $stage (at ${SECONDS}s)" >>"$LOG"
  case "$stage" in
    test)  # compiled GPU tests, then the CPU tests through the interpreter (Triton reads TRITON_INTERPRET at import)
      fits 60 || continue
      # the ops' own GPU tests first, torch.compile's (minutes of inductor compiles) last: a time limit then
      # cuts what matters least, and pytest still reports what ran (SIGINT). Most of their time is Triton and
      # inductor compiling on one CPU core, so TEST_WORKERS (default 8) processes share the GPU (pytest-xdist,
      # in the image), two CPU threads each; TEST_WORKERS=0 runs them in one process, in file order.
      TAIL=15 timed "${TEST_LIMIT_S:-240}" env TRITON_INTERPRET=0 OMP_NUM_THREADS=2 python3 -m pytest -q -m gpu \
        --durations=15 $(xdist "${TEST_WORKERS:-8}") \
        ${TEST_PATHS:-tests/test_spectral_conv.py tests/test_kan.py tests/test_kernel_sum.py tests/test_gp_module.py \
        tests/test_precompile.py tests/test_host_sync.py \
        tests/test_autocast.py tests/test_func_transforms.py tests/test_graph_op.py}
      # the KAN base path inside the forward kernel (off by default: wrong compiled on an H100, kernels/kan.py)
      [ "${TEST_FUSED_BASE:-1}" = 1 ] && TAIL=3 timed 60 env OPFORGE_KAN_FUSED_BASE=1 TRITON_INTERPRET=0 \
        python3 -m pytest -q -m gpu tests/test_kan.py -k bspline
      [ "${TEST_CPU:-1}" = 1 ] && TAIL=5 timed 400 env TRITON_INTERPRET=1 python3 -m pytest -q $(xdist 8) -m "not gpu" tests ;;
    check)  # every variant, torch included, against the torch variant in float64 (forward, main shapes)
      fits 60 || continue
      TAIL=30 timed 300 python3 perf/check_float64.py --ops spectral_conv kan
      timed 200 python3 perf/check_float64.py --ops kernel_sum --cases 1e5-d3-r1 2e5-d64-r16 1e4-d256-r1 1e5-d3-r1-matern52
      # float32 under torch's TF32 setting: the 'float32-tf32' tolerance row against measured errors
      TAIL=14 timed 200 python3 perf/check_float64.py --tf32 --ops spectral_conv kan --cases 2d-256-b32-c64-m32 \
        2d-94-b20-c32-m16 rbf-b4096-512-g8 chebyshev-b4096-512-d8 fourier-b4096-512-g8 ;;
    bench)
      fits 60 || continue
      TAIL=40 timed 300 python3 -m opforge.autotune.cli bench ;;
    tune)
      fits 60 || continue
      for op in ${OPS:-spectral_conv kan kernel_sum}; do
        modes="TUNE_MODES_$op"  # TUNE_MODES_<op> (say TUNE_MODES_kernel_sum=fwd) overrides TUNE_MODES for one op
        TAIL=30 timed "${TUNE_LIMIT_S:-300}" python3 -m opforge.autotune.cli tune --op "$op" --dtype ${TUNE_DTYPES:-float32 bfloat16} \
          --mode ${!modes:-${TUNE_MODES:-fwd fwdbwd}} --cases "${CASE_SET:-gpu}" ${CASES:+--case $CASES} --out "$OUT/caches/$tag.json" ${TUNE_ARGS:-}
      done ;;
    perf)  # one suite per op, each under its own time limit; records accumulate in one results file
      fits 60 || continue
      for op in ${OPS:-spectral_conv kan kernel_sum}; do
        # (pytest-xdist's worker variables dropped: inherited, they turn pytest-benchmark off)
        TAIL=1 timed "${PERF_LIMIT_S:-240}" env -u PYTEST_XDIST_WORKER -u PYTEST_XDIST_WORKER_COUNT \
          python3 -m pytest "perf/bench_$op.py" -q -p no:cacheprovider \
          --opforge-results="$OUT/results/$tag.json" \
          --opforge-dtypes="$(echo ${PERF_DTYPES:-float32 bfloat16} | tr ' ' ,)" \
          --opforge-cases="${CASE_SET:-gpu}" --opforge-case-names="$(echo ${CASES:-} | tr ' ' ,)"
      done
      [ -f "$OUT/results/$tag.json" ] && python3 -m opforge.autotune.cli perf-table "$OUT/results/$tag.json" 2>&1 \
        | tee -a "$LOG" | tail -60 ;;
    profile)  # per-kernel device time of the main shapes: which stage to speed up next
      fits 60 || continue
      for spec in "spectral_conv 2d-256-b32-c64-m32 dft_gemm" "spectral_conv 2d-256-b32-c64-m32 fft_mix" \
                  "spectral_conv 2d-256-b32-c64-m32 torch" "spectral_conv 2d-256-b32-c64-m32 dft_gemm --mode fwd" \
                  "kan rbf-b4096-512-g8 staged" "kan bspline-b4096-512-g8 staged" \
                  "kan rbf-b4096-512-g8 fused" "kan chebyshev-b4096-512-d8 fused" \
                  "kan chebyshev-b4096-512-d8 fused --tf32" "kan chebyshev-b4096-512-d8 torch" \
                  "kan bspline-b4096-512-g8 fused" "kan fourier-b4096-512-g8 fused" \
                  "kernel_sum 2e5-d64-r16 flash" "kernel_sum 1e6-d3-r1 flash --mode fwd"; do
        TAIL=10 timed 120 python3 perf/profile_op.py $spec
      done ;;
    example)
      fits 60 || continue
      timed 200 python3 perf/gp_example.py --n 100000 --fit-steps 3 --n-var 1000
      # the solvers' Cholesky and conjugate-gradient paths on the GPU: where "auto"'s switch at 800 points stands
      timed 120 python3 perf/solver_paths.py --n 200 800 1600 3200 --json "$OUT/solvers/$tag.json"
      # GPRegression against GPyTorch's exact GP in the same run (GPyTorch from .whl: perf/peer_wheels.sh)
      timed 150 python3 perf/gp_peer.py --n 200 800 1600 3200 --json "$OUT/gp/$tag.json"
      timed 120 python3 perf/first_call.py ;;
    *) echo "unknown stage $stage (test check bench tune perf profile example)"; exit 2 ;;
  esac
done
echo "== done at ${SECONDS}s" | tee -a "$LOG"
