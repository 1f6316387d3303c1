"""The command line: the main job runs and reports, and misuse says what to do."""
import json
import os
import subprocess
import sys

import pytest

from opforge.autotune.cli import main


def test_bench_torch_paths(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "spectral_conv" in out and "FAIL" not in out and "2d-small-odd" in out


def test_bench_interpret_checks_every_triton_variant():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "opforge.autotune.cli", "bench", "--interpret"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for v in ("dft_gemm", "fft_mix", "torch"):
        assert v in r.stdout
    assert "FAIL" not in r.stdout


def test_interpreter_probe_passes_here_and_names_the_numpy_fix():
    from opforge.kernels._triton import interpreter_advice, interpreter_problem

    assert interpreter_problem() is None  # the conftest would have stopped the run otherwise
    try:  # the error Triton 3.6's interpreter raises under NumPy 2.4, re-raised as Triton does
        try:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        except TypeError as inner:
            raise RuntimeError(repr(inner)) from inner
    except RuntimeError as e:
        advice = interpreter_advice(e)
    assert "numpy<2.4" in advice and "0-dimensional" in advice
    assert "numpy" not in interpreter_advice(ValueError("something else")).lower()


def test_list_and_tune_without_gpu(capsys):
    assert main(["list"]) == 0
    assert "spectral_conv: torch" in capsys.readouterr().out
    import torch

    if not torch.cuda.is_available():
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run([sys.executable, "-m", "opforge.autotune.cli", "tune"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


@pytest.mark.parametrize("argv, says", [
    (["bench", "--op", "nosuch"], "argument --op: unknown op(s) ['nosuch']; registered: ['kan', 'kernel_sum'"),
    (["tune", "--interpret", "--op", "kan", "kan2"], "unknown op(s) ['kan2']"),
    (["tune", "--interpret", "--op", "kan", "--case", "bspline-smal-odd"],
     "unknown case(s) ['bspline-smal-odd']; the cases of kan: ['bspline-b100-1000-g5'"),
    # a real case outside the set tuned (small here, gpu for --compile-only) names the set it is in
    (["tune", "--interpret", "--case", "2d-256-b32-c64-m32"],
     "not in the case set 'small': 2d-256-b32-c64-m32 is in gpu, main (its sets: gpu, main)"),
    (["tune", "--compile-only", "90", "--case", "bspline-small-odd"], "bspline-small-odd is in small"),
    (["tune", "--interpret", "--case", "bspline-b1024-256-g8"], "bspline-b1024-256-g8 is in no set tune covers"),
    # perf-check's settings, refused before the suite runs (a NaN threshold failed every ratio after minutes of
    # timing; an unknown dtype stopped the suite with a pytest usage error)
    (["tune", "--interpret", "--dtype"], "argument --dtype: expected at least one argument"),
    (["perf-check", "--threshold", "nan"], "argument --threshold: must be a finite relative drop >= 0"),
    (["perf-check", "--threshold", "-0.1"], "must be a finite relative drop >= 0"),
    (["perf-check", "--dtypes", "float32,float99"], "argument --dtypes: unknown dtype(s) ['float99']"),
    (["perf-check", "--dtypes", "bfloat16-tf32"], "unknown dtype(s) ['bfloat16-tf32']"),
])
def test_names_that_name_nothing_are_usage_errors(argv, says, tmp_path, capsys):
    """A mistyped op or case, or a case outside the set tuned, stops the command (exit 2) with the valid names,
    where it used to tune nothing and print an empty table (or raise a traceback, for bench --op)."""
    with pytest.raises(SystemExit) as exc:
        main(argv + (["--out", str(tmp_path / "c.json")] if argv[0] == "tune" else []))
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_tune_sms_without_compile_only_is_an_error(tmp_path, capsys):
    """--sms sizes a --compile-only run for a GPU not at hand; with a tuning run it was silently ignored."""
    assert main(["tune", "--interpret", "--sms", "100", "--out", str(tmp_path / "c.json")]) == 2
    assert "--sms only applies with --compile-only" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_tune_refuses_an_out_file_it_would_destroy_or_cannot_write(tmp_path, capsys):
    """Checked before any tuning: --out naming a file that is not an autotune cache (the cache writer replaces
    an unreadable file, which would lose a results file named by mistake), a folder, or a path that cannot be
    written (that failed at the first entry's write, after its timing, with a traceback). An empty file or a
    new path in a new folder is fine."""
    results = tmp_path / "results.json"
    results.write_text('{"format": 1, "records": []}')
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where --out needs a folder")
    tune = ["tune", "--interpret", "--op", "kan", "--case", "bspline-small-odd", "--mode", "fwd", "--out"]
    for out, says in ((results, "exists and is not an opforge autotune cache"), (tmp_path, "is a folder"),
                      (blocker / "c.json", "cannot be written")):
        assert main(tune + [str(out)]) == 2
        assert f"--out {out} {says}" in capsys.readouterr().err
    assert results.read_text() == '{"format": 1, "records": []}'
    empty = tmp_path / "new" / "empty.json"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.warns(RuntimeWarning, match="ignoring unreadable autotune cache"):  # (the empty file, replaced)
        assert main(tune + [str(empty)]) == 0
    assert main(tune + [str(tmp_path / "newer" / "c.json")]) == 0
    for out in (empty, tmp_path / "newer" / "c.json"):
        assert json.loads(out.read_text())["ops"]["kan"]
    assert sorted(p.name for p in empty.parent.iterdir()) == ["empty.json"]  # (no probe file left)


def test_tune_case_of_another_op_leaves_that_op_out(tmp_path, capsys):
    """perf/gpu_session.sh runs tune once per op with one list of case names: in the run of an op that has
    none of them, the others' names are no error; nothing of that op is tuned, and it says so."""
    out = str(tmp_path / "c.json")
    assert main(["tune", "--interpret", "--op", "kan", "--case", "2d-small-odd", "--out", out]) == 0
    assert "no case of kan in the case set 'small' among the --case names" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("op, case, variant, kernels", [
    ("kan", "rbf-small-odd", "fused", ["_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dw_kernel"]),
    ("kan", "chebyshev-small-odd", "fused", ["_kan_fwd_kernel", "_kan_dx_kernel", "_kan_dwk_kernel"]),
    # (the forward's basis, then the backward's: grad W's GEMMs read it, grad x's kernel follows its GEMMs)
    ("kan", "fourier-small-odd", "staged", ["_kan_basis_kernel", "_kan_basis_kernel", "_kan_dx_cols_kernel"]),
    # (grad b is summed in grad y's pass: GRAD_B_FUSED)
    ("kernel_sum", "small-d3-r1", "flash", ["_ksum_fwd_kernel", "_ksum_grad_kernel", "_ksum_grad_kernel"]),
])
def test_inspect_kernels_compiles_for_an_h100_without_one(op, case, variant, kernels):
    """perf/inspect_kernels.py compiles (never runs) every launch of a variant for sm_90 and reports each."""
    import re
    from pathlib import Path

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    script = Path(__file__).resolve().parents[1] / "perf" / "inspect_kernels.py"
    r = subprocess.run([sys.executable, str(script), op, case, variant, "--mode", "fwdbwd"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  _")]
    assert [ln.split()[0] for ln in lines] == kernels, r.stdout
    assert all(re.search(r"\d+ regs", ln) and ("mma" in ln or "no MMA" in ln) for ln in lines), r.stdout
    assert all(re.search(r"loops \d+ ins \(\d+ MUFU\)", ln) for ln in lines), r.stdout
    # its own empty Triton cache: the first launch of each kernel compiles it (a second alike finds it)
    assert all(re.search(r"compiled in \d+\.\d\d s$", ln) for ln in lines), r.stdout


def test_sass_loop_counts():
    """Loops are backward branches; a loop's size counts every instruction from its target to the branch."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "inspect_kernels.py"
    spec = importlib.util.spec_from_file_location("inspect_kernels_t", path)
    sass = "\n".join([
        "        Function : k",
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;       /* 0x00000a0000017a02 */",
        "        /*0010*/                   FADD R2, R2, R3 ;            /* 0x0000000302027221 */",
        "        /*0020*/                   MUFU.EX2 R4, R2 ;            /* 0x0000000200047308 */",
        "        /*0030*/                   FFMA R5, R4, R4, R5 ;        /* 0x0000000404057223 */",
        "        /*0040*/              @P0 BRA 0x20 ;                    /* 0xfffffffc00f80947 */",
        "        /*0050*/              @P1 BRA 0x10 ;                    /* 0xfffffff800e81947 */",
        "        /*0060*/                   BRA 0x60;                    /* 0xfffffffc00fc7947 */",
    ])
    import sys
    sys.path.insert(0, str(path.parent))  # inspect_kernels imports case_args beside it
    interp = os.environ.get("TRITON_INTERPRET")  # the script sets it to 0 on import: keep this process's
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
        if interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = interp
    assert mod.sass_loops(sass) == [(3, 1), (5, 1)]


_NO_TRITON = r'''
import sys
# a machine without Triton: `import triton` fails and importlib.util.find_spec("triton") is None (what a
# finder that raised instead would break: torch 2.13's CUDA build probes for Triton with find_spec at import)
sys.modules["triton"] = None
import torch
import opforge.kernels as K
from opforge.autotune.cli import main
assert not K.HAS_TRITON and K.registered_ops() == {op: ["torch"] for op in ("spectral_conv", "kernel_sum", "kan")}
torch.manual_seed(0)
out = {}
for name, m, x in [("spectral", K.SpectralConv(2, 3, (4, 5)), torch.randn(2, 2, 9, 8)),
                   ("bspline", K.KANLinear(5, 3), torch.randn(7, 5)), ("rbf", K.FastKANLayer(5, 3), torch.randn(7, 5)),
                   ("chebyshev", K.ChebyKANLayer(5, 3, 4), torch.randn(7, 5)),
                   ("fourier", K.FourierKANLayer(5, 3, 3), torch.randn(7, 5))]:
    x.requires_grad_()
    y = m(x)
    y.square().sum().backward()
    out[name] = [y.detach(), x.grad] + [p.grad for p in m.parameters() if p.requires_grad]
x, y, b = torch.randn(9, 3), torch.randn(11, 3), torch.randn(11, 2)
out["kernel_sum"] = [K.kernel_matvec(x, y, b, "matern52", lengthscale=0.7),
                     K.kernel_solve(x, b[:9], "gaussian", noise=0.1)]
torch.save(out, sys.argv[1])
try:
    with K.use_backend("triton"):
        K.kernel_matvec(x, y, b)
    raise SystemExit("use_backend('triton') ran without Triton")
except ValueError as e:
    assert "Triton is not installed" in str(e), e
assert main(["bench", "--op", "kan"]) == 0
assert main(["bench", "--interpret", "--op", "kan"]) == 2
'''


def test_without_triton_the_torch_paths_give_the_same_results(tmp_path):
    """No Triton on the machine (macOS, Windows, a minimal image): opforge imports, registers its torch variants
    only, and every op and module runs forward and backward with the results of a machine with Triton (CPU
    dispatch is the torch variant there too); asking for Triton says it is missing."""
    import torch

    import opforge.kernels as K

    script = tmp_path / "no_triton.py"
    script.write_text(_NO_TRITON)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OPFORGE_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "out.pt")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Triton is not installed" in r.stderr and "FAIL" not in r.stdout
    got = torch.load(tmp_path / "out.pt")
    # the same calls here, with Triton importable
    code = _NO_TRITON.split("torch.manual_seed(0)")[1].split("torch.save")[0]
    scope = {"torch": torch, "K": K}
    exec("torch.manual_seed(0)" + code, scope)
    want = scope["out"]
    assert got.keys() == want.keys()
    for key in want:
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            torch.testing.assert_close(g, w, msg=key)  # (MKL least squares in the KAN init: last-bit wobble)


_OLD_TRITON = r'''
import triton
triton.__version__ = "3.2.0"  # a Triton older than the kernels need (torch 2.6 pins this one)
import torch
import opforge.kernels as K
from opforge.autotune.cli import main
assert not K.HAS_TRITON and K.TRITON_MISSING == "Triton 3.2.0 is older than the 3.3 opforge's kernels need"
assert K.registered_ops() == {op: ["torch"] for op in ("spectral_conv", "kernel_sum", "kan")}
x, y, b = torch.randn(9, 3), torch.randn(11, 3), torch.randn(11, 2)
assert K.kernel_matvec(x, y, b).shape == (9, 2)
try:
    with K.use_backend("triton"):
        K.kernel_matvec(x, y, b)
    raise SystemExit("use_backend('triton') ran with a Triton too old")
except ValueError as e:
    assert "Triton 3.2.0 is older than the 3.3" in str(e) and "pip install -U triton" in str(e), e
assert main(["bench", "--interpret", "--op", "kan"]) == 2
'''


def test_a_triton_too_old_for_the_kernels_leaves_the_torch_variants_and_says_so():
    """Triton older than ``MIN_TRITON`` (its kernels fail to compile there, or its interpreter runs none): opforge
    registers the torch variants only, as without Triton, and every request for Triton names the version."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _OLD_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Triton 3.2.0 is older than the 3.3 opforge's kernels need (`pip install -U triton`)" in r.stderr


def test_tune_stopped_by_sigint_prints_what_it_finished(monkeypatch, tmp_path, capsys):
    """A time limit's SIGINT in the middle of ``opforge tune``: the shapes finished so far are in the winners
    table, the output says it was interrupted, and the exit status is 130 (the shell's for SIGINT)."""
    from opforge.autotune import cli, tuner

    def tune_op(op, cases, dev, dtype, out, modes, rows):
        rows.append({"op": op.name, "case": cases[0].name, "dtype": "float32", "mode": "fwd", "variant": "torch",
                     "config": None, "ms": 1.0, "torch_ms": 1.0, "speedup": 1.0})
        raise KeyboardInterrupt

    monkeypatch.setattr(tuner, "tune_op", tune_op)
    rc = cli.main(["tune", "--interpret", "--op", "kan", "--case", "rbf-small-odd", "--dtype", "float32",
                   "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert rc == 130 and "interrupted" in out and "rbf-small-odd" in out


def test_host_overhead_script_times_every_op():
    """perf/host_overhead.py: one line per op with a positive host time per step (kernel runs stubbed out)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "perf" / "host_overhead.py"
    r = subprocess.run([sys.executable, str(script), "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["kan", "spectral_conv", "kernel_sum"], r.stdout
    assert all(float(ln.split()[1]) > 0 for ln in lines), r.stdout


def test_gp_example_fits_then_predicts():
    """perf/gp_example.py with --fit-steps and --n-var: a line per Adam step on the log marginal likelihood, the
    solve with the fitted hyperparameters, then the predictive variance's line (on a few hundred points here)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "perf" / "gp_example.py"
    r = subprocess.run([sys.executable, str(script), "--n", "300", "--n-test", "50", "--fit-steps", "2",
                        "--n-var", "20", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:2]] == ["fit step 0", "fit step 1"], r.stdout
    assert "test RMSE" in lines[2] and lines[3].startswith("predictive variance at 20 test points"), r.stdout


def test_solver_paths_times_both_methods(tmp_path):
    """perf/solver_paths.py: a line per (N, call) with both methods' times and the speedup, and how far apart
    the two solves are (small: the same problem solved two ways)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "perf" / "solver_paths.py"
    out = tmp_path / "solvers.json"
    r = subprocess.run([sys.executable, str(script), "--n", "30", "--repeat", "1", "--device", "cpu", "--json",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads(out.read_text())
    assert [(rec["n"], rec["call"]) for rec in records] == [(30, c) for c in ("kernel_solve", "mll+grad",
                                                                             "variance@1000", "cg_vs_cholesky")]
    assert all(rec["cg_ms"] / rec["cholesky_ms"] == pytest.approx(rec["speedup"], rel=0.01) for rec in records[:3])
    rows = [ln.split() for ln in r.stdout.splitlines()[2:]]
    assert [row[1] for row in rows] == ["kernel_solve", "mll+grad", "variance@1000", "cg_vs_cholesky"], r.stdout
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and row[4].endswith("x") for row in rows[:3]), r.stdout
    assert float(rows[3][2]) < 1e-3, r.stdout


def test_gp_peer_times_both_libraries(tmp_path):
    """perf/gp_peer.py: GPyTorch's exact GP and GPRegression on the same data and parameters, a record per
    (N, call) with both times and the speedup, and each one's errors against the float64 reference (small at
    25 points, where both factor the matrix)."""
    pytest.importorskip("gpytorch")
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "perf" / "gp_peer.py"
    out = tmp_path / "gp.json"
    r = subprocess.run([sys.executable, str(script), "--n", "25", "--t", "7", "--repeat", "1", "--device", "cpu",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads(out.read_text())
    assert [(rec["n"], rec["call"]) for rec in records] == [(25, c) for c in ("mll+grad", "predict-cold@7",
                                                                             "predict-warm@7", "accuracy")]
    assert all(rec["gpytorch_ms"] / rec["opforge_ms"] == pytest.approx(rec["speedup"], rel=0.01)
               for rec in records[:3])
    errors = records[3]
    assert all(errors[f"{lib}_{q}_error"] < 1e-4 for lib in ("gpytorch", "opforge")
               for q in ("mll", "mean", "variance")), errors
    assert records[0]["command"] == f"python perf/gp_peer.py --n 25 --t 7 --repeat 1 --device cpu --json {out}"
    assert records[0]["gpytorch"] and records[0]["kernel"] == "matern52"


def test_perf_table_renders_the_script_records(tmp_path):
    """`opforge perf-table` renders perf/results/solvers/ and perf/results/gp/ from their records: a caption
    with the command, device and versions, a row per (N, call), the agreement below; a file that is not such
    records is an error naming it."""
    from opforge.autotune.cli import perf_tables

    common = dict(device="cpu (x86_64, 2 threads)", kernel="matern52", torch="2.x", commit="abc1234", repeat=3)
    (tmp_path / "gp").mkdir()
    (tmp_path / "gp" / "cpu.json").write_text(json.dumps([
        dict(n=200, call="mll+grad", gpytorch_ms=4.0, opforge_ms=2.0, speedup=2.0, gpytorch="1.15",
             command="python perf/gp_peer.py --n 200", **common),
        dict(n=200, call="accuracy", gpytorch_mll_error=1e-7, opforge_mll_error=2e-7, gpytorch_mean_error=3e-6,
             opforge_mean_error=4e-6, gpytorch_variance_error=5e-6, opforge_variance_error=6e-6,
             gpytorch="1.15", command="python perf/gp_peer.py --n 200", **common)]))
    (tmp_path / "solvers").mkdir()
    (tmp_path / "solvers" / "cpu.json").write_text(json.dumps([
        dict(n=800, call="kernel_solve", cholesky_ms=1.5, cg_ms=15.0, speedup=10.0, **common),
        dict(n=800, call="cg_vs_cholesky", relative=7e-5, **common)]))
    text = perf_tables(tmp_path)
    solvers, gp = text.split("#### `solvers/cpu.json`")[1].split("#### `gp/cpu.json`")
    assert "Made by `python perf/gp_peer.py --n 200` on cpu (x86_64, 2 threads), torch 2.x, GPyTorch 1.15" in gp
    assert "| 200 | mll+grad | 4.000 | 2.000 | 2.00x |" in gp
    assert "| N | log-likelihood GPyTorch | log-likelihood opforge | mean GPyTorch |" in gp
    assert "| 200 | 1.0e-07 | 2.0e-07 | 3.0e-06 | 4.0e-06 | 5.0e-06 | 6.0e-06 |" in gp
    assert "Made by `perf/solver_paths.py` on" in solvers  # (records without their command)
    assert "| 800 | kernel_solve | 1.500 | 15.000 | 10.00x |" in solvers and "| 800 | 7.0e-05 |" in solvers
    (tmp_path / "gp" / "bad.json").write_text(json.dumps({"records": []}))
    with pytest.raises(ValueError, match="bad.json is not a list of perf script records"):
        perf_tables(tmp_path)


@pytest.mark.parametrize("args, says", [
    (["--cases", "nosuch"], "unknown case(s) ['nosuch']"),
    (["--ops", "kernel_sum", "--cases", "2d-256-b32-c64-m32"],
     "unknown case(s) ['2d-256-b32-c64-m32'] of ['kernel_sum']"),
    (["--tags", "bogus"], "no case of"),
    (["--ops", "kan", "nosuch"], "unknown op 'nosuch'"),
])
def test_dev_scripts_refuse_selections_of_nothing(args, says):
    """perf/check_float64.py checked nothing and passed (a header, exit 0) on a mistyped case or set."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "perf" / "check_float64.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and says in r.stderr, r.stdout + r.stderr


def test_check_float64_exits_1_over_tolerance(monkeypatch, capsys):
    """A variant over its tolerance fails the float64 check (it printed OVER and exited 0)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "check_float64", Path(__file__).resolve().parents[1] / "perf" / "check_float64.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "tolerance", lambda *a: 0.0)
    monkeypatch.setattr(mod, "bench", lambda *a, **k: {"p50": 0.0})
    monkeypatch.setattr(sys, "argv", ["check_float64.py", "--device", "cpu", "--ops", "kan", "--cases",
                                      "chebyshev-small-odd"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 1
    out = capsys.readouterr()
    assert "OVER" in out.out and "over their tolerance" in out.err


def _gpu_session(tmp_path, *stages, **env_over):
    """perf/gpu_session.sh as a lent GPU runs it, here on the CPU: ``python3`` is this interpreter."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shim = tmp_path / "bin"
    if not shim.exists():
        shim.mkdir()
        # a script, not a link: a virtual environment's python linked from elsewhere leaves the environment
        (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (shim / "python3").chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PATH=f"{shim}{os.pathsep}{os.environ['PATH']}",
               SCRATCH=str(tmp_path), **env_over)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(root / "perf" / "gpu_session.sh"), *stages], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    return r, (tmp_path / "out" / "session.log").read_text()


def test_gpu_session_tune_stage_takes_per_op_modes(tmp_path):
    """The tune stage end to end on a CPU (TUNE_ARGS=--interpret): TUNE_MODES_<op> overrides TUNE_MODES for that
    op (kernel sums tuned for the forward call their targets name), and the cache lands in $OUT/caches."""
    r, log = _gpu_session(tmp_path, "tune", OPS="kernel_sum", CASE_SET="small", CASES="small-d3-r1",
                          TUNE_DTYPES="float32", TUNE_MODES="fwd fwdbwd", TUNE_MODES_kernel_sum="fwd",
                          TUNE_ARGS="--interpret", BUDGET_S="300")
    assert r.returncode == 0 and "== tune (at" in log, r.stdout + r.stderr
    (cache_file,) = (tmp_path / "out" / "caches").glob("*.json")
    keys = [k for by_hash in json.loads(cache_file.read_text())["ops"]["kernel_sum"].values() for k in by_hash]
    assert keys and all(not k.endswith("|train") for k in keys), keys


def test_gpu_session_script_runs_a_perf_stage_and_keeps_to_its_budget(tmp_path):
    """The one command a lent GPU gets (perf/gpu_session.sh) runs its perf stage end to end on a CPU: the
    log, a results file with records, the table; a budget too small for a stage skips it and says so."""
    r, log = _gpu_session(tmp_path, "perf", OPS="kernel_sum", CASE_SET="small", CASES="small-d3-r1",
                          PERF_DTYPES="float32", BUDGET_S="300", OPFORGE_COMMIT="abc1234")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "== perf (at" in log and "== done at" in log and "commit abc1234" in log
    (results,) = (tmp_path / "out" / "results").glob("*.json")
    from opforge.autotune import perf

    data = perf.read(results)
    assert {x["variant"] for x in data["records"]} >= {"torch", "public-call"}
    assert "| kernel_sum | small-d3-r1 |" in r.stdout
    r, log = _gpu_session(tmp_path, "perf", OPS="kernel_sum", BUDGET_S="40")
    assert r.returncode == 0 and "== skipped: perf" in log, r.stdout + r.stderr
