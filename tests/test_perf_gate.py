"""The perf results files and the regression gate, unit-level and end to end through `opforge perf-check` on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opforge.autotune import perf

ROOT = Path(__file__).resolve().parents[1]


def rec(variant, p50, spread=0.02, case="c", mode="fwd"):
    return {"op": "op", "case": case, "mode": mode, "dtype": "float32", "variant": variant,
            "p20": p50 * (1 - spread / 2), "p50": p50, "p80": p50 * (1 + spread / 2)}


def test_ratios_are_same_run_speedups():
    r = perf.ratios([rec("torch", 2.0), rec("fast", 0.5)])
    (ratio, spread), = r.values()
    assert ratio == pytest.approx(4.0) and spread == pytest.approx(0.02)


def test_an_interleaved_records_speedup_uses_its_own_torch_timings():
    """A record timed alternately with the torch variant (perf/conftest.py's anchor) is compared with those
    timings, not with the torch record of another test (the machine may have been slower then)."""
    anchored = dict(rec("fast", 0.5), anchor_p20=0.95, anchor_p50=1.0, anchor_p80=1.05)
    r = perf.ratios([rec("torch", 2.0), anchored])
    (ratio, spread), = r.values()
    assert ratio == pytest.approx(2.0) and spread == pytest.approx(0.1)
    assert perf.ratios([anchored]) == r  # no torch record needed
    assert "(2.00x)" in perf.markdown_table([rec("torch", 2.0), anchored], {})


def test_compare_ok_regressed_missing_new():
    base = [rec("torch", 2.0), rec("fast", 0.5), rec("gone", 1.0), rec("torch", 1.0, case="d"), rec("v", 0.5, case="d")]
    cur = [rec("torch", 2.0), rec("fast", 0.52), rec("torch", 1.0, case="d"), rec("v", 1.0, case="d"),
           rec("new", 0.1)]
    rows, failures = perf.compare(cur, base, threshold=0.10)
    status = {(r["case"], r["variant"]): r["status"] for r in rows}
    assert status == {("c", "fast"): "ok", ("c", "gone"): "missing", ("c", "new"): "new", ("d", "v"): "REGRESSED"}
    assert {(f["case"], f["variant"]) for f in failures} == {("c", "gone"), ("d", "v")}


def test_compare_leaves_cases_the_run_did_not_time_out():
    """A run narrowed by --cases, --dtypes or -k (`opforge perf-check` on a CPU runs the small set; the
    committed CPU baseline also holds the cpu set) does not fail on the cases it left out: they are
    "not run". A variant gone from a case the run timed is still "missing", a failure."""
    base = [rec("torch", 2.0), rec("fast", 0.5), rec("torch", 1.0, case="d"), rec("v", 0.5, case="d"),
            rec("torch", 1.0, mode="fwdbwd"), rec("fast", 0.5, mode="fwdbwd")]
    cur = [rec("torch", 2.0), rec("fast", 0.5), rec("torch", 1.0, mode="fwdbwd")]
    rows, failures = perf.compare(cur, base, threshold=0.10)
    status = {(r["case"], r["mode"], r["variant"]): r["status"] for r in rows}
    assert status == {("c", "fwd", "fast"): "ok", ("d", "fwd", "v"): "not run",
                      ("c", "fwdbwd", "fast"): "missing"}
    assert [(f["case"], f["mode"]) for f in failures] == [("c", "fwdbwd")]


def test_peer_rows_gate_opforges_torch_path_over_the_peer():
    """A peer's row gates opforge's torch path against the peer: the torch path twice as slow beside KeOps is a
    regression (the peer's ratio over torch rose, which passed), the torch path twice as fast is not (the
    peer's ratio fell, which failed). opforge's variants and public-call keep their speedup over torch."""
    def r(variant, p50):
        return dict(rec(variant, p50), op="kernel_sum")

    base = [r("torch", 1.0), r("keops", 0.5), r("flash", 0.25), r("public-call", 0.3)]
    slower_torch = [r("torch", 2.0), r("keops", 0.5), r("flash", 0.5), r("public-call", 0.6)]
    rows, failures = perf.compare(slower_torch, base, 0.10)
    got = {x["variant"]: (x["speedup"], x["status"], round(x["current"], 3)) for x in rows}
    assert got == {"keops": ("torch over keops", "REGRESSED", 0.25), "flash": ("flash over torch", "ok", 4.0),
                   "public-call": ("public-call over torch", "ok", 3.333)}
    faster_torch = [r("torch", 0.5), r("keops", 0.5), r("flash", 0.125), r("public-call", 0.15)]
    assert perf.compare(faster_torch, base, 0.10)[1] == []


def test_measured_spread_widens_the_allowance():
    base = [rec("torch", 1.0), rec("v", 0.5)]
    noisy = [rec("torch", 1.0, spread=0.6), rec("v", 0.7, spread=0.6)]  # ratio 2.0 -> 1.43, 29% drop
    assert perf.compare(noisy, base, 0.10)[1] == []
    quiet = [rec("torch", 1.0), rec("v", 0.7)]
    assert len(perf.compare(quiet, base, 0.10)[1]) == 1
    # however noisy the run, a speedup that more than halved is flagged (spread 1.5 would allow any drop)
    wild = [rec("torch", 1.0, spread=1.5), rec("v", 1.1, spread=1.5)]  # ratio 2.0 -> 0.91
    (row,) = perf.compare(wild, base, 0.10)[1]
    assert row["status"] == "REGRESSED" and row["allowed"] == pytest.approx(0.5)


def test_results_roundtrip_and_table(tmp_path):
    path = tmp_path / "r.json"
    env = {"gpu": "cpu", "cc": "0.0", "torch": "x", "triton": "y", "commit": "abc"}
    perf.write(path, [rec("torch", 2.0), rec("fast", 0.5)], env)
    data = perf.read(path)
    assert data["env"]["commit"] == "abc" and len(data["records"]) == 2
    table = perf.markdown_table(data["records"], data["env"])
    assert "0.500 (4.00x)" in table and "Measured on cpu" in table
    mem = dict(rec("fast", 0.5, mode="fwdbwd"), peak_mb=300.4, saved_mb=20.2)
    assert "0.500, 300/20 MB" in perf.markdown_table([mem], data["env"])
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="not an opforge perf results file"):
        perf.read(path)


def test_merge_write_accumulates_one_environment(tmp_path):
    path = tmp_path / "r.json"
    env = {"gpu": "cpu", "cc": "0.0", "torch": "x", "triton": "y", "commit": "abc"}
    perf.merge_write(path, [rec("torch", 2.0)], env)
    perf.merge_write(path, [rec("fast", 0.5), rec("torch", 1.5)], env)  # a second suite of the same run
    got = {r["variant"]: r["p50"] for r in perf.read(path)["records"]}
    assert got == {"torch": 1.5, "fast": 0.5}
    perf.merge_write(path, [rec("fast", 0.4)], dict(env, commit="def"))  # another commit starts afresh
    assert [r["variant"] for r in perf.read(path)["records"]] == ["fast"]


def _cli(*args, cwd=ROOT, **env_over):
    env = dict(os.environ, **env_over)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "opforge.autotune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_perf_check_end_to_end_on_cpu(tmp_path):
    """--update writes a baseline from a real run of perf/; a rerun passes against it; a doctored baseline fails."""
    base = tmp_path / "base.json"
    sel = ["-k", "1d-small-odd"]
    # as when the tests run under pytest-xdist (-n): perf-check's suites must not inherit its worker variable
    r = _cli("perf-check", "--update", "--baseline", str(base), "--quiet", "--passes", "2", *sel,
             PYTEST_XDIST_WORKER="gw0", PYTEST_XDIST_WORKER_COUNT="2")
    assert r.returncode == 0, r.stdout + r.stderr
    data = perf.read(base)
    variants = {x["variant"] for x in data["records"]}
    assert "torch" in variants and len(variants) >= 2
    assert all(x["passes"] == 2 for x in data["records"]) and "pass 2 of 2" in r.stdout
    # on a CPU every other variant is timed alternately with the torch variant, round by round
    assert all(x["anchor_p20"] <= x["anchor_p50"] <= x["anchor_p80"] for x in data["records"] if x["variant"] != "torch")
    r = _cli("perf-check", "--baseline", str(base), "--threshold", "20", "--quiet", *sel)
    assert r.returncode == 0, r.stdout + r.stderr
    for x in data["records"]:
        if x["variant"] != "torch":
            x["p50"] /= 1000.0  # the baseline claims the peer was 1000x faster
            x["p20"] /= 1000.0
            x["p80"] /= 1000.0
    perf.write(base, data["records"], data["env"])
    r = _cli("perf-check", "--baseline", str(base), "--quiet", *sel)
    assert r.returncode == 1 and "REGRESSED" in r.stdout, r.stdout + r.stderr


def test_unreadable_results_files_are_errors_that_name_them(tmp_path, capsys, monkeypatch):
    """perf-table on a missing, non-JSON or foreign file, or a missing folder or README, and perf-check on a
    missing or corrupt baseline: exit 2 with the path and what is wrong (tracebacks before; perf-check found
    its baseline missing only after minutes of suite), and no suite run."""
    from opforge.autotune import cli

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text("[1, 2]")
    for argv, says in ((["perf-table", str(tmp_path / "none.json")], "none.json: no such perf results file"),
                       (["perf-table", str(bad)], "bad.json is not a readable perf results file (JSONDecodeError"),
                       (["perf-table", str(foreign)], "foreign.json is not an opforge perf results file"),
                       (["perf-table", "--results-dir", str(tmp_path / "no")], "no is not a folder"),
                       (["perf-table", "--results-dir", str(tmp_path), "--readme", str(tmp_path / "R.md")],
                        "R.md: no such file")):
        assert cli.main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("the suite ran"))
    assert cli.main(["perf-check", "--baseline", str(bad)]) == 2
    assert "baseline: " in capsys.readouterr().err
    assert cli.main(["perf-check", "--baseline", str(tmp_path / "none.json")]) == 2
    assert "no baseline for this device" in capsys.readouterr().err


@pytest.mark.parametrize("option, says", [("--opforge-case-names=bspline-small-odd,nosuch",
                                             "--opforge-case-names: unknown case(s) ['nosuch']"),
                                            ("--opforge-dtypes=float32,float99", "unknown dtype(s) ['float99']")])
def test_perf_suites_refuse_names_that_name_nothing(option, says):
    """A mistyped case name ran no benchmark of that case and passed (gpu_session.sh's CASES); an unknown dtype
    failed every test at its fixture. Both stop the suite before anything is timed."""
    r = subprocess.run([sys.executable, "-m", "pytest", "perf/bench_kan.py", "--collect-only", "-q", "-p",
                        "no:cacheprovider", option], cwd=ROOT, env=perf.suite_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 4 and says in r.stdout + r.stderr, r.stdout + r.stderr


def test_perf_suites_refuse_to_run_under_xdist(monkeypatch):
    """pytest-benchmark turns itself off under pytest-xdist, so a perf suite there would time nothing: it
    stops at once and says why, for -n and for a worker variable inherited from a test process; perf-check
    starts its suites without such variables."""
    pytest.importorskip("xdist")
    suite = [sys.executable, "-m", "pytest", "perf/bench_kernel_sum.py", "--collect-only", "-q", "-p", "no:cacheprovider"]
    plain = perf.suite_env()  # this run may itself be under -n
    for extra, env in (([], dict(plain, PYTEST_XDIST_WORKER="gw1")), (["-n", "1"], plain)):
        r = subprocess.run(suite + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 4 and "without -n" in r.stderr, r.stdout + r.stderr
        assert ("'gw1'" in r.stderr) == (not extra), r.stderr
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("OPFORGE_SOMETHING", "kept")
    env = perf.suite_env()
    assert "PYTEST_XDIST_WORKER" not in env and env["OPFORGE_SOMETHING"] == "kept"


def test_readme_tables_are_generated_from_results_files():
    """The README's perf block is exactly what `opforge perf-table --readme` makes from perf/results/."""
    from opforge.autotune.cli import BEGIN, END, perf_tables

    text = (ROOT / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block.strip() == perf_tables(ROOT / "perf" / "results").strip()


def test_issue_targets_are_checked_from_records():
    """`Op.targets` rows: speedup against the first peer present, fraction of peak, memory ratios; a missing
    timing is 'not measured' (met None), never a pass."""
    import opforge.kernels  # noqa: F401  (registers the ops)

    case = "2d-256-b32-c64-m32"

    def r(variant, p50, **extra):
        return {"op": "spectral_conv", "case": case, "mode": "fwdbwd", "dtype": "float32", "variant": variant,
                "p20": p50, "p50": p50, "p80": p50, **extra}

    records = [r("torch", 10.0), r("neuraloperator", 8.0, peak_mb=1000.0),
               r("dft_gemm", 2.0, peak_mb=400.0, frac_peak_bw=0.6), r("fft_mix", 3.0, peak_mb=100.0)]
    rows = {row["target"].split()[0]: row for row in perf.target_rows(records)}
    assert rows["speedup"]["variant"] == "dft_gemm" and rows["speedup"]["against"] == "neuraloperator"
    assert rows["speedup"]["met"] is True and rows["speedup"]["measured"].startswith("4.00x")
    assert rows[">="]["met"] is True and rows[">="]["measured"] == "60.0%"
    assert rows["peak"]["met"] is True and rows["peak"]["measured"].startswith("0.40x")  # the fastest's memory
    slow = [x for x in records if x["variant"] != "dft_gemm"]
    rows = {row["target"].split()[0]: row for row in perf.target_rows(slow)}
    assert rows["speedup"]["met"] is False and rows["speedup"]["variant"] == "fft_mix"
    alone = {row["target"].split()[0]: row for row in perf.target_rows([r("dft_gemm", 2.0)])}
    assert alone["speedup"]["met"] is None and alone["speedup"]["measured"] == "not measured"
    assert perf.target_rows([dict(r("torch", 1.0), case="2d-small-odd")]) == []  # no target case: no table


def test_kan_activation_target_counts_the_input():
    import opforge.kernels  # noqa: F401

    def r(variant, saved):
        return {"op": "kan", "case": "rbf-b4096-512-g8", "mode": "fwdbwd", "dtype": "float32", "variant": variant,
                "p20": 1.0, "p50": 1.0, "p80": 1.0, "saved_mb": saved, "peak_mb": 10.0}

    rows = [row for row in perf.target_rows([r("fused", 2.0), r("nn.Linear", 0.0)])
            if row["target"].startswith("activation") and row["case"] == "rbf-b4096-512-g8"]
    assert rows[0]["met"] is True and rows[0]["measured"].startswith("1.25x")  # x is 4096 x 512 x 4 B = 8 MB
    rows = [row for row in perf.target_rows([r("fused", 8.0), r("nn.Linear", 0.0)])
            if row["target"].startswith("activation") and row["case"] == "rbf-b4096-512-g8"]
    assert rows[0]["met"] is False


def test_static_table_leaves_out_records_of_changed_kernels():
    def r(kernel, h):
        return {"op": "op", "case": "c", "variant": "v", "mode": "fwd", "dtype": "float32", "source_hash": h,
                "config": {}, "kernel": kernel, "grid": [4, 1, 1], "warps": 4, "smem": 0, "mma": ["no MMA"],
                "access": "", "regs": 96, "spill_st": 0, "spill_ld": 0, "loops": [[13, 0], [147, 16]],
                "arch": 90, "triton": "3.6.0", "commit": "abc"}

    data = {"format": 1, "kind": "static", "records": [dict(r("_now", "h1"), compile_s=1.25, host_cpus=2),
                                                        dict(r("_now", "h1"), compile_s=0.0, host_cpus=2),
                                                        r("_gone", "h0")]}
    table = perf.static_table(data, {"op": "h1"})
    assert "_now" in table and "_gone" not in table and "1 records of kernels changed since" in table
    assert table.count("| _now |") == 1  # a kernel launched twice alike is one line: the one that compiled it
    assert "147 (16), 1 loops of <= 13 | 1.25 |" in table and "on the 2-CPU host" in table
    assert "rerun" in perf.static_table(data, {"op": "h2"})


def test_tables_flag_ops_whose_code_changed_since():
    import opforge.kernels  # noqa: F401
    from opforge.kernels import get_op

    now = get_op("kan").source_hash()

    def r(h):
        return dict(rec("torch", 1.0), op="kan", source_hash=h)

    assert perf.changed_ops([r(now), r(now)]) == []
    assert perf.changed_ops([r(now), r("0123")]) == ["kan"]
    assert perf.changed_ops([dict(rec("torch", 1.0), op="kan")]) == ["kan"]  # made before hashes were recorded
    assert "Code changed since" in perf.markdown_table([r("0123")], {"commit": "abc"})
    assert "Code changed since" not in perf.markdown_table([r(now)], {"commit": "abc"})


def test_merge_static_replaces_one_runs_records(tmp_path):
    def r(case, kernel):
        return {"op": "op", "case": case, "variant": "v", "mode": "fwd", "dtype": "float32", "kernel": kernel}

    path = tmp_path / "static" / "s.json"
    perf.merge_static(path, [r("a", "k1"), r("b", "k1")], {"commit": "c1"})
    perf.merge_static(path, [r("a", "k2"), r("a", "k3")], {"commit": "c2"})
    recs = perf.read_static(path)["records"]
    assert [(x["case"], x["kernel"], x["commit"]) for x in recs] == [("a", "k2", "c2"), ("a", "k3", "c2"),
                                                                     ("b", "k1", "c1")]


def test_least_disturbed_pass_keeps_each_records_fastest():
    rec = lambda v, p50: {"op": "o", "case": "c", "variant": v, "mode": "fwd", "dtype": "float32",  # noqa: E731
                          "p20": p50 * 0.9, "p50": p50, "p80": p50 * 1.1}
    merged = perf.least_disturbed([[rec("torch", 2.0), rec("peer", 1.0)], [rec("torch", 1.5), rec("peer", 3.0)]])
    got = {r["variant"]: (r["p50"], r["p20"], r["passes"]) for r in merged}
    assert got == {"torch": (1.5, 1.35, 2), "peer": (1.0, 0.9, 2)}


def test_records_say_which_config_a_triton_variant_ran(tmp_path, monkeypatch):
    """perf/conftest.py records a Triton variant's config and whether the autotune cache or its heuristic
    default gave it, and the table caption counts them: a results file says which of its rows were tuned."""
    import importlib.util

    from opforge.autotune import cache
    from opforge.kernels import get_op
    from opforge.kernels._triton import device_info

    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("perf_conftest", ROOT / "perf" / "conftest.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path))
    op = get_op("spectral_conv")
    p, _ = op.make_inputs(next(c for c in op.cases if c.name == "2d-small-odd"), "cpu")
    assert conf._config_of(op, "torch", p, train=False) == {}
    got = conf._config_of(op, "fft_mix", p, train=False)
    assert got == {"config": op.variants["fft_mix"].default_config(p), "config_from": "heuristic"}
    fast = {"MIX_R": 16, "MIX_O": 32, "MIX_S": 16, "num_warps": 4}
    cache.record(cache.user_dir() / cache.file_name(device_info()), device_info(), op, p,
                 {"variant": "fft_mix", "config": fast, "ms": 1.0, "timings": [{"variant": "fft_mix", "config": fast,
                                                                                "ms": 1.0}]})
    assert conf._config_of(op, "fft_mix", p, train=False) == {"config": fast, "config_from": "cache"}
    assert conf._config_of(op, "dft_gemm", p, train=False)["config_from"] == "heuristic"
    recs = [dict(rec("fft_mix", 1.0), config_from="cache"), dict(rec("dft_gemm", 1.0), config_from="heuristic"),
            rec("torch", 2.0)]
    assert "Triton rows: 1 at their fastest config in the autotune cache, 1 at their heuristic default" in \
        perf.markdown_table(recs, {})
