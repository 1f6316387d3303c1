"""opforge tune's precompile: worker processes compile every config's kernels for the GPU into Triton's disk
cache, where a later process launching the same calls finds them (no GPU here: both compile for sm_90)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import pytest

pytest.importorskip("triton")

# the kernels of a small plan, compiled for sm_90 (2 kernel-sum configs and 1 KAN config, each forward and
# forward + backward: 6 calls), precompiled in workers, then launched compile-only in a fresh process
_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from opforge.autotune import precompile
    from opforge.kernels import get_op

    def files():
        return sorted(os.path.relpath(os.path.join(d, f), os.environ["TRITON_CACHE_DIR"])
                      for d, _, fs in os.walk(os.environ["TRITON_CACHE_DIR"]) for f in fs)

    tasks = []
    for name, case, n in [("kernel_sum", "small-d3-r1", 2), ("kan", "rbf-small-odd", 1)]:
        op = get_op(name)
        plan = precompile.plan(op, [c for c in op.cases if c.name == case], ["float32"], ["fwd", "fwdbwd"])
        cfgs = list(dict.fromkeys(json.dumps(t[5], sort_keys=True) for t in plan))[:n]
        tasks += [t for t in plan if json.dumps(t[5], sort_keys=True) in cfgs]
    if sys.argv[1] == "workers":
        logged = []
        summary = precompile.precompile(tasks, 2, 90, 132, log=logged.append)
        print(json.dumps({"summary": summary, "log": logged, "files": files(), "tasks": len(tasks)}))
    elif sys.argv[1] == "cuda":  # on a GPU: workers compile for it, then the tuner's real launches find them
        import torch
        from opforge.autotune import tuner

        major, minor = torch.cuda.get_device_capability()
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        summary = precompile.precompile(tasks, 2, 10 * major + minor, sms, log=lambda m: None)
        before = files()
        for op_name, case_name, dt, mode, variant, cfg in tasks:  # as autotune/tuner.py calls each config
            op = get_op(op_name)
            case = next(c for c in op.cases if c.name == case_name)
            problem, args = op.make_inputs(case, "cuda", getattr(torch, dt), requires_grad=mode == "fwdbwd")
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            tuner._step(op.variants[variant], problem, args, leaves, None, cfg)
            torch.cuda.synchronize()
        after = files()
        print(json.dumps({"summary": summary, "new": [f for f in after if f not in before],
                          "cubins": sum(f.endswith(".cubin") for f in before)}))
    else:  # the tuner's side: the same calls launched in this process, compile-only, on the cache just filled
        seconds = []
        with precompile.compile_only(90, 132, lambda fn, grid, kw, kernel, s: seconds.append(s)):
            errors = [precompile._compile_task(t)[2] for t in tasks]
        print(json.dumps({"files": files(), "errors": errors, "launches": len(seconds)}))
""")


def _run(tmp_path, mode):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env["TRITON_INTERPRET"] = "0"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_precompiled_kernels_are_found_by_a_later_process(tmp_path):
    first = _run(tmp_path, "workers")
    summary = first["summary"]
    assert first["tasks"] == 6 and summary["tasks"] == 6
    assert summary["compiled"] == 6 and summary["failed"] == 0 and summary["jobs"] == 2, first
    assert any(f.endswith(".cubin") for f in first["files"]), first["files"]
    assert "6 of 6 configs' kernels for sm_90" in first["log"][-1]
    second = _run(tmp_path, "lookup")
    assert second["errors"] == [None] * 6
    assert second["launches"] > 6  # every call launches a kernel, forward + backward several
    assert second["files"] == first["files"]  # nothing compiled again: every kernel was in the cache


@pytest.mark.gpu
def test_precompiled_kernels_are_found_by_launches_on_the_gpu(tmp_path):
    """The claim the tuner relies on, on a real GPU: kernels compiled by the CPU-tensor workers for this GPU's
    arch and SM count are the ones its CUDA launches look up (no kernel binary compiled again; the launcher
    stubs Triton builds at a first launch are not kernels)."""
    got = _run(tmp_path, "cuda")
    assert got["summary"]["compiled"] == 6 and got["cubins"] > 0, got
    assert [f for f in got["new"] if f.endswith((".cubin", ".ptx", ".ttgir"))] == [], got["new"]


def test_precompile_survives_configs_that_do_not_compile_and_no_jobs():
    from opforge.autotune import precompile

    logged, before = [], os.environ.get("TRITON_INTERPRET")
    import torch

    from opforge.kernels import get_op

    op = get_op("kernel_sum")
    problem, _ = op.make_inputs(next(c for c in op.cases if c.name == "small-d3-r1"), "cpu", torch.float32)
    cfg = dict(op.variants["flash"].default_config(problem), BLOCK_N=3)  # not a power of two: no compile
    bad = ("kernel_sum", "small-d3-r1", "float32", "fwd", "flash", cfg)
    summary = precompile.precompile([bad], 1, 90, 132, log=logged.append)
    assert summary["failed"] == 1 and summary["compiled"] == 0, (summary, logged)
    assert precompile.precompile([bad], 0, 90, 132, log=logged.append)["jobs"] == 0
    assert os.environ.get("TRITON_INTERPRET") == before  # the caller's interpreter setting is back


def test_plan_lists_every_config_the_tuner_times():
    import torch

    from opforge.kernels import get_op

    from opforge.autotune import precompile

    op = get_op("kan")
    case = next(c for c in op.cases if c.name == "rbf-small-odd")
    plan = precompile.plan(op, [case], ["float32", "float32-tf32"], ["fwd", "fwdbwd"])
    problem, _ = op.make_inputs(case, "cpu", torch.float32)
    n_fwd, n = (sum(len(v.tuning_configs(problem, train)) for v in op.triton_variants()) for train in (False, True))
    assert n_fwd < n  # (fused's grad-x block: a forward-only tuning times one of each pair)
    assert len(plan) == 2 * (n_fwd + n)
    starts = (0, n_fwd, n_fwd + n, 2 * n_fwd + n)  # each (dtype, mode)'s calls in a run
    assert [plan[i][2:4] for i in starts] == [("float32", "fwd"), ("float32", "fwdbwd"), ("float32-tf32", "fwd"),
                                              ("float32-tf32", "fwdbwd")]
    assert len({t[2:4] for t in plan[n_fwd:n_fwd + n]}) == 1


def test_launchers_size_their_grids_by_the_target_gpu(monkeypatch):
    """In a compile-only run the launchers read the SM count of the GPU compiled for, as on that GPU."""
    import torch

    from opforge.kernels import _triton, get_op, kan

    op = get_op("kan")
    case = next(c for c in op.cases if c.name == "rbf-small-odd")
    problem, _ = op.make_inputs(case, "cpu", torch.float32)
    cfg = dict(op.variants["fused"].default_config(problem), BLOCK_B=16, SPLITS=0)
    cpu = torch.device("cpu")
    assert _triton.sm_count(cpu) is None and kan._sm_count(cpu) == 4
    interpreted = kan._dw_splits(problem, cfg, 4096, cpu)
    monkeypatch.setattr(_triton, "_COMPILE_TARGET_SMS", 132)
    assert _triton.sm_count(cpu) == 132 and kan._sm_count(cpu) == 132
    assert kan._dw_splits(problem, cfg, 4096, cpu) > interpreted


def test_tune_refuses_negative_jobs():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "opforge.autotune.cli", "tune", "--jobs", "-1"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--jobs must be 0 or more" in r.stderr



def test_tune_on_a_gpu_precompiles_the_configs_it_will_time(monkeypatch, tmp_path):
    """The CUDA branch of ``opforge tune`` (no GPU here: CUDA's answers stubbed, the timing loop too): the plan
    covers the selected ops, cases, dtypes and modes, for the GPU's compute capability and SM count."""
    import types

    import torch

    from opforge.autotune import cli, precompile, tuner
    from opforge.kernels import _triton

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(_triton, "device_info", lambda *a: {"name": "NVIDIA H100 80GB HBM3", "cc": "9.0",
                                                            "triton": "3.6", "tag": "h100"})
    seen, timed = {}, []
    monkeypatch.setattr(precompile, "precompile", lambda tasks, jobs, arch, sms, log: seen.update(
        tasks=tasks, jobs=jobs, arch=arch, sms=sms))
    monkeypatch.setattr(tuner, "tune_op", lambda op, cases, dev, dtype, out, modes, rows: timed.append(
        (op.name, [c.name for c in cases], dev, dtype, modes)) or rows)
    assert cli.main(["tune", "--op", "kan", "--cases", "small", "--case", "rbf-small-odd", "--dtype", "float32",
                     "float32-tf32", "--mode", "fwdbwd", "--jobs", "3", "--out", str(tmp_path / "c.json")]) == 0
    assert (seen["jobs"], seen["arch"], seen["sms"]) == (3, 90, 132)
    assert {t[:5] for t in seen["tasks"]} == {("kan", "rbf-small-odd", dt, "fwdbwd", v)
                                              for dt in ("float32", "float32-tf32") for v in ("staged", "fused")}
    assert len(seen["tasks"]) == 2 * len({str(t[5]) for t in seen["tasks"]})
    assert timed == [("kan", ["rbf-small-odd"], "cuda", torch.float32, ("fwdbwd",))] * 2  # then timed, per dtype
    seen.clear()
    assert cli.main(["tune", "--op", "kan", "--cases", "small", "--case", "rbf-small-odd", "--jobs", "0",
                     "--out", str(tmp_path / "c.json")]) == 0
    assert seen == {}  # --jobs 0: nothing precompiled

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompile, "precompile", interrupted)  # a time limit's SIGINT while precompiling
    timed.clear()
    assert cli.main(["tune", "--op", "kan", "--cases", "small", "--case", "rbf-small-odd", "--jobs", "2",
                     "--out", str(tmp_path / "c.json")]) == 130
    assert timed == []



def test_tune_compile_only_fills_the_triton_cache_for_a_gpu_that_is_not_here(tmp_path):
    """``opforge tune --compile-only 90``: the precompile alone, on a machine without a GPU."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "tc"), TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "opforge.autotune.cli", "tune", "--op", "kernel_sum", "--cases", "small",
           "--case", "small-d3-r1", "--mode", "fwd", "--jobs", "1"]
    r = subprocess.run(cmd + ["--compile-only", "90"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "for sm_90 (132 SMs)" in r.stdout and "0 did not compile" in r.stdout, r.stdout
    cubins = [f for _, _, fs in os.walk(tmp_path / "tc") for f in fs if f.endswith(".cubin")]
    assert cubins
    r = subprocess.run(cmd + ["--compile-only", "75"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs --sms N" in r.stderr


def test_default_jobs_leaves_a_core_and_4_gib_a_worker(monkeypatch):
    from opforge.autotune import precompile

    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 16)
    for available, jobs in ((None, 15), (9 << 30, 2), (1 << 30, 1), (512 << 30, 15)):
        monkeypatch.setattr(precompile, "_available_bytes", lambda a=available: a)
        assert precompile.default_jobs() == jobs
    monkeypatch.undo()
    assert precompile._available_bytes() > 0  # read from /proc/meminfo (or sysconf) here


# Every op's Triton variants at its small cases (float32, forward + backward, default configs) compiled for
# sm_90, each kernel's PTX kept: the registers that FMA instructions write, and the float compares against an
# exact 0 that read one of them
_FMA_SCAN = textwrap.dedent(r"""
    import json, re
    from opforge.autotune import precompile
    from opforge.kernels import get_op, registered_ops

    fma = re.compile(r"fma\.rn\.f32\s+(%[rf]\d+),")
    zero_test = re.compile(r"setp\.(?:eq|ne|equ|neu)\.f32\s+%p\d+,\s*(?:(%[rf]\d+),\s*0f00000000|0f00000000,\s*(%[rf]\d+));")
    hits, kernels = [], set()

    def on_launch(fn, grid, kwargs, kernel, seconds):
        ptx = kernel.asm["ptx"]
        kernels.add(fn.__name__)
        written = set(fma.findall(ptx))
        for a, b in zero_test.findall(ptx):
            if (a or b) in written:
                hits.append(fn.__name__)

    tasks = []
    for name in registered_ops():
        op = get_op(name)
        small = [c for c in op.cases if "small" in c.tags]
        for t in precompile.plan(op, small, ["float32"], ["fwdbwd"]):
            if (name,) + t[1:5] + (None,) not in tasks:
                tasks.append((name,) + t[1:5] + (None,))  # each variant at its default config
    with precompile.compile_only(90, 132, on_launch):
        errors = [e for _, _, e in map(precompile._compile_task, tasks) if e]
    print(json.dumps({"tasks": len(tasks), "errors": errors, "kernels": sorted(kernels), "hits": sorted(set(hits))}))
""")


def test_no_kernel_compares_an_fma_result_with_exact_zero(tmp_path):
    """Compiled, Triton fuses a product and a sum into one FMA (FP fusion, its default), whose result is not
    the rounded product's: ``(v - v) == 0`` on v = a * b became ``fma(a, b, -v) == 0``, the product's rounding
    error, and the fused KAN grad x came back NaN on an H200 while every interpreter test passed (the
    interpreter rounds each op). An exact test against 0 of an FMA's result is that hazard: no kernel of any
    op, compiled for sm_90, has one (the old grad-x kernel fails this under Triton 3.3 and 3.9)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", _FMA_SCAN], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["errors"] == [] and got["tasks"] > 10, got
    assert {"_kan_dx_kernel", "_ksum_fwd_kernel", "_mix_kernel"} <= set(got["kernels"]), got["kernels"]
    assert got["hits"] == [], f"kernels comparing an FMA result with exact 0: {got['hits']}"
