"""Shared machinery of the perf suites (pytest-benchmark).

Every suite test times one (op, case, variant, mode, dtype) with
``benchmark.pedantic``: on CUDA each round is followed by a synchronize and
preceded (untimed) by an L2 flush, so rounds are cold-cache like
``triton.testing.do_bench``. Each test appends a record; with
``--opforge-results FILE`` they are written to a results file after every test
(``opforge perf-check`` drives this).

Options: ``--opforge-cases small|cpu|gpu|main|all`` or a comma-separated list of sets (default: gpu on
CUDA, small on CPU; cpu: torch-path sizes a CPU user meets),
``--opforge-case-names NAME,...`` (only those cases of the set),
``--opforge-dtypes float32,float32-tf32,bfloat16`` (default float32; ``float32-tf32`` is float32 with
torch's float32 matmul setting at TF32 for the test, so opforge's dots and every baseline's matmuls use
TF32 alike).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from opforge.autotune import perf as perf_results
from opforge.autotune.timing import flush_l2
from opforge.kernels._triton import allow_tf32, device_info, device_peaks

_RECORDS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--opforge-results", default=None, help="write the perf records to this JSON file")
    parser.addoption("--opforge-cases", default=None, help="case sets, comma-separated: small, cpu, gpu, main, all")
    parser.addoption("--opforge-case-names", default="", help="only these cases of the set (comma-separated names)")
    parser.addoption("--opforge-dtypes", default="float32")
    parser.addoption("--opforge-interleave", default="auto", choices=("auto", "on", "off"),
                     help="time each variant round by round alternately with the torch variant on the same inputs, "
                          "so its speedup comes from like moments (auto: on a CPU, whose speed drifts)")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    """Parametrize ``case`` from the suite's OP cases, and ``dtype`` from --opforge-dtypes."""
    cfg = metafunc.config
    if "case" in metafunc.fixturenames:
        op = metafunc.module.OP
        want = set(perf_results.case_sets(cfg.getoption("--opforge-cases")
                                          or ("gpu" if device().type == "cuda" else "small")))
        names = {n.strip() for n in cfg.getoption("--opforge-case-names").split(",") if n.strip()}
        cases = [c for c in op.cases if ("all" in want or want & set(c.tags)) and (not names or c.name in names)]
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
    if "dtype" in metafunc.fixturenames:
        names = [n.strip() for n in cfg.getoption("--opforge-dtypes").split(",") if n.strip()]
        metafunc.parametrize("dtype", names, ids=names, indirect=True)


@pytest.fixture
def dtype(request):
    """The torch dtype of a ``--opforge-dtypes`` name; ``float32-tf32`` runs the test with TF32 allowed."""
    name = request.param
    base = name.removesuffix("-tf32")
    if not isinstance(getattr(torch, base, None), torch.dtype) or (name != base and base != "float32"):
        raise pytest.UsageError(f"--opforge-dtypes: unknown dtype {name!r} (float32, float32-tf32, bfloat16, ...)")
    with allow_tf32(name != base):
        yield getattr(torch, base)


def _flush_l2(dev):
    if dev.type == "cuda":
        flush_l2(dev)
        torch.cuda.synchronize(dev)


class Perf:
    def __init__(self, benchmark, config=None):
        self.benchmark = benchmark
        self.config = config

    def anchor(self, op, variant: str, problem, args: tuple, params: list, grad_out, backward: bool,
               torch_fwd=None):
        """The torch variant's timed call on ``args`` (``step`` of it) to interleave with ``variant``'s, or
        None: for the torch variant itself, where its baseline is not timed (``Op.baseline_skip``), and unless
        --opforge-interleave is on (auto: on a CPU). ``torch_fwd``: the torch variant's call where a row times
        more than the op (a module around it), else ``op.run_variant("torch", problem, *args)``."""
        mode = self.config.getoption("--opforge-interleave") if self.config is not None else "off"
        on = mode == "on" or (mode == "auto" and problem.device.type == "cpu")
        if not on or variant == "torch" or op.baseline_skip(problem):
            return None
        fwd = torch_fwd or (lambda *a: op.run_variant("torch", problem, *a))
        return self.step(fwd, args, params, grad_out, backward)

    @staticmethod
    def skip_public_call_on_gpu(problem):
        """The ``public-call`` rows (the op's public function: checks, dispatch, then the variant it picks)
        show per-call costs that matter on a CPU; a GPU run spends no device time on them."""
        if problem.device.type == "cuda":
            pytest.skip("the public call is timed on a CPU, where its per-call checks and dispatch show")

    @staticmethod
    def skip_unless_timed(op, variant: str, problem):
        """Skip a variant that cannot run this problem, and Triton variants off the GPU (interpreter times mean nothing)."""
        reason = op.variants[variant].why_not(problem)
        if reason or (variant != "torch" and problem.device.type != "cuda"):
            pytest.skip(reason or "Triton variants are timed on the GPU only")

    @staticmethod
    def step(fwd, args: tuple, params: list, grad_out, backward: bool):
        """The timed call: ``fwd(*args)`` under no_grad, or forward + backward(grad_out) with fresh grads."""
        def run():
            if not backward:
                with torch.no_grad():
                    return fwd(*args)
            for t in params:
                t.grad = None
            fwd(*args).backward(grad_out)
        if backward:
            run.forward = lambda: fwd(*args)  # for the activation-memory reading
        return run

    def run(self, op, case, variant: str, mode: str, problem, fn, rounds: int | None = None, anchor=None):
        """Time ``fn`` (one forward, or forward+backward) and record it. With ``anchor`` (``Perf.anchor``: the
        torch variant's call on the same inputs) each round times both, in alternating order, and the record
        keeps the torch variant's quantiles of those same rounds as ``anchor_p20/p50/p80``: its speedup then
        compares like moments of a machine whose speed drifts between tests."""
        dev = problem.device

        def timed(f):
            def call():
                f()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
            return call

        target = timed(fn)
        if rounds is None:
            target()  # compiles
            t0 = time.perf_counter()
            target()  # a slow call gets fewer rounds, so a suite stays within minutes
            if anchor is not None:
                timed(anchor)()
            # 30 rounds within 2 s a test on a GPU, 0.5 s on a CPU (whose timings jump by 1.5x at times: 5 rounds
            # there gave a 1.6x "gap" that 25 interleaved calls did not show)
            budget = 2.0 if dev.type == "cuda" else 0.5
            rounds = max(3, min(30, int(budget / max(time.perf_counter() - t0, 1e-6))))
        if anchor is None:
            self.benchmark.pedantic(target, setup=lambda: _flush_l2(dev), rounds=rounds, warmup_rounds=2, iterations=1)
            data, anchor_data = sorted(self.benchmark.stats.stats.data), None
        else:  # pytest-benchmark times the pair; each call's own time is taken here
            times = {"target": [], "anchor": []}
            calls = {"target": target, "anchor": timed(anchor)}

            def pair():
                order = ("anchor", "target") if len(times["target"]) % 2 else ("target", "anchor")
                for name in order:
                    _flush_l2(dev)
                    t0 = time.perf_counter()
                    calls[name]()
                    times[name].append(time.perf_counter() - t0)

            self.benchmark.pedantic(pair, rounds=rounds, warmup_rounds=2, iterations=1)
            data, anchor_data = sorted(times["target"][2:]), sorted(times["anchor"][2:])  # past the warm-up pairs

        def q(f, d=data):
            return 1e3 * d[min(len(d) - 1, int(round(f * (len(d) - 1))))]

        rec = {"op": op.name, "case": case.name, "shape": _shape(case), "variant": variant, "mode": mode,
               "dtype": problem.dtype_name, "p20": q(0.2), "p50": q(0.5), "p80": q(0.8), "rounds": len(data),
               "source_hash": op.source_hash()}  # the README tables flag rows of code changed since
        if anchor_data:
            rec.update(anchor_p20=q(0.2, anchor_data), anchor_p50=q(0.5, anchor_data), anchor_p80=q(0.8, anchor_data))
        rec.update(_config_of(op, variant, problem, train=mode == "fwdbwd"))
        if op.roofline is not None:
            roof = op.roofline(problem)
            peaks = device_peaks(device_info()["name"])
            if roof.get("bound", "memory") == "memory":
                scale = 2 if mode == "fwdbwd" else 1  # backward reads grad_y and writes grad_x once more
                rec["gbps"] = scale * roof["bytes"] / (rec["p50"] * 1e-3) / 1e9
                rec["frac_peak_bw"] = rec["gbps"] / peaks["gbps"] if peaks else None
            else:
                scale = roof.get("fwdbwd_factor", 3) if mode == "fwdbwd" else 1  # backward passes of similar cost
                rec["tflops"] = scale * roof["flops"] / (rec["p50"] * 1e-3) / 1e12
                peak = roof.get("peak", "fp32_tflops")
                rec["frac_peak_flops"] = rec["tflops"] / peaks[peak] if peaks else None
                rec["peak"] = peak
        if dev.type == "cuda" and mode == "fwdbwd":
            from opforge.autotune.timing import peak_memory

            rec["peak_mb"] = peak_memory(fn, dev) / 2**20
            if hasattr(fn, "forward"):
                from opforge.autotune.timing import saved_memory

                rec["saved_mb"] = saved_memory(fn.forward, dev) / 2**20
        self.benchmark.extra_info.update(rec)
        _RECORDS.append(rec)
        _write_results()  # after every record: a suite cut short by a time limit keeps what it measured
        return rec


def _config_of(op, variant: str, problem, train: bool) -> dict:
    """For a Triton variant: the config its timed calls ran with (``Op.config_for``, as ``run_variant`` picks
    it) and where that came from, ``cache`` (timed in this GPU's autotune cache) or ``heuristic`` (its
    default), so a results file says which of its rows were tuned."""
    v = op.variants.get(variant)
    if v is None or v.kind != "triton":
        return {}
    from opforge.autotune import cache

    entry = cache.lookup(op, problem, train=train)
    tuned = any(t["variant"] == variant for t in (entry or {}).get("timings", []))
    return {"config": op.config_for(v, problem, entry=entry, train=train), "config_from": "cache" if tuned else "heuristic"}


def _shape(case) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.params.items())


@pytest.fixture
def perf(benchmark, request):
    return Perf(benchmark, request.config)


_RESULTS_PATH: list[str] = []


def pytest_configure(config):
    # pytest-benchmark turns itself off under pytest-xdist (its -n, or a PYTEST_XDIST_WORKER variable, which a
    # process started from a test running under xdist inherits): every test would then fail on empty stats
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if config.getoption("dist", default="no") != "no" or worker:
        inherited = (f" and without the PYTEST_XDIST_WORKER variable (set: {worker!r}, inherited from a "
                     "pytest-xdist worker?)") if worker else ""
        raise pytest.UsageError("the perf suites time one test at a time and pytest-benchmark is off under "
                                "pytest-xdist: run them without -n" + inherited)
    # names that name nothing are errors before anything is timed (a mistyped case ran no benchmark of it and
    # passed; an unknown dtype failed each test at its fixture)
    names = {n.strip() for n in config.getoption("--opforge-case-names", default="").split(",") if n.strip()}
    if names:
        from opforge.kernels import get_op, registered_ops

        known = {c.name for op in registered_ops() for c in get_op(op).cases}
        if names - known:
            raise pytest.UsageError(f"--opforge-case-names: unknown case(s) {sorted(names - known)}")
    try:
        perf_results.dtype_names(config.getoption("--opforge-dtypes", default="float32"))
    except ValueError as exc:
        raise pytest.UsageError(f"--opforge-dtypes: {exc}") from None
    path = config.getoption("--opforge-results", default=None)
    _RESULTS_PATH[:] = [path] if path else []


def _write_results() -> None:
    if _RESULTS_PATH and _RECORDS:
        perf_results.merge_write(_RESULTS_PATH[0], _RECORDS, perf_results.environment(device_info()))


def pytest_sessionfinish(session, exitstatus):
    _write_results()
