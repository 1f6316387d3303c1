"""Compile a tuning run's kernels before it times them, on the host's other CPU cores.

Most of a config's first call in ``opforge tune`` is Triton compiling its kernels: 0.3 to 2 s each on one
core (the ``compile s`` column of the static table in the README), several per config in forward +
backward, one after another while the GPU waits. Over the issues' main shapes alone that is minutes of a
device session. So the tuner first hands every (op, case, dtype, mode, variant, config) it will time to
worker processes (``precompile``). A worker runs the variant's launcher on CPU tensors of the case, with
every Triton launch turned into Triton's compile-only ``warmup`` for the tuner's GPU (``compile_only``: a
stand-in driver names the GPU's compute capability; launchers that size their grids to the GPU read its SM
count through ``opforge.kernels._triton.sm_count``). Nothing runs and the GPU is not touched: each kernel
is only written to Triton's disk cache.

The tuner's own launches then find them there. Triton's cache key is the kernel's source, its
specialisation (argument dtypes, 16-byte alignment, integers equal to 1 or divisible by 16, constexprs),
the compile options and the target, and CPU tensors of the same shapes reproduce all of them (the
launchers' allocations are aligned on both devices). A kernel the workers did not reproduce is compiled
by the tuner as before, so nothing depends on it but the time: the tuner logs each config's first call
(``first call 0.02 s`` is a cache hit, a second or more a compile) and stores it as ``first_s``.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# SMs of the GPU a compute capability stands for when it is not here (the H100 SXM and the H200 both have 132)
SM_COUNT = {90: 132}

# a worker holds the CPU inputs of one case at a time; the main spectral case in forward + backward (x of
# 537 MB, CPU FFTs of its size in fft_mix) peaked at about 3 GB, so one worker per 4 GiB of available memory
_WORKER_BYTES = 4 << 30


class CompileOnlyDriver:
    """Enough of a Triton driver for ``JITFunction.run(warmup=True)`` to compile for a GPU that is not
    here (or that must not be touched): compute capability ``arch`` (90: H100/H200)."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int, sms: int | None = None, on_launch=None):
    """Inside, every Triton launch compiles its kernel for ``sm_<arch>`` and runs nothing (outputs stay
    uninitialised); launchers read ``sms`` as the GPU's SM count; ``on_launch(jit_fn, grid, kwargs,
    kernel, seconds)`` sees each launch (seconds: the compile, or a lookup of a kernel compiled before).

    For a process of its own: Triton keeps each kernel's target per device once it has been launched, so
    kernels launched on a real GPU earlier in the process would not be compiled for ``arch``, and those
    compiled inside would keep the stand-in target afterwards. Uses Triton internals
    (``driver.set_active`` and ``_active``, ``JITFunction.run``), checked on Triton 3.6 and 3.9."""
    import triton.runtime.jit as _jit
    from triton.runtime import driver

    from opforge.kernels import _triton

    run = _jit.JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if on_launch is not None:
            on_launch(self, grid, kwargs, kernel, time.perf_counter() - t0)
        return kernel

    prev_sms = _triton._COMPILE_TARGET_SMS
    prev_driver = getattr(driver, "_active", None)  # (reset_active() would create the default one: no GPU, no driver)
    driver.set_active(CompileOnlyDriver(arch))
    _jit.JITFunction.run = compile_run
    _triton._COMPILE_TARGET_SMS = sms
    try:
        yield
    finally:
        _jit.JITFunction.run = run
        driver.set_active(prev_driver)
        _triton._COMPILE_TARGET_SMS = prev_sms


def plan(op, cases, dtypes, modes) -> list[tuple]:
    """The tuner's calls of ``op``: (op, case, dtype name, mode, variant, config) for every case, dtype
    name (``float32-tf32`` included), mode (``fwd``, ``fwdbwd``) and config of every Triton variant that
    supports the case, grouped by (case, dtype, mode) so a worker reuses its inputs."""
    import torch

    from opforge.kernels._triton import allow_tf32

    out = []
    for case in cases:
        for dt in dtypes:
            base = dt.removesuffix("-tf32")
            with allow_tf32(dt != base):  # the problem records the precision its configs are built for
                # (on CPU tensors, not meta ones: a problem can hold facts read from values, such as
                # whether B-spline knots are uniform, which pick the kernels and can shape the grid)
                problem, args = op.make_inputs(case, "cpu", getattr(torch, base))
                del args
            for mode in modes:
                for v in op.triton_variants():
                    if v.supports is None or v.supports(problem) is None:
                        out += [(op.name, case.name, dt, mode, v.name, cfg)
                                for cfg in v.tuning_configs(problem, train=mode == "fwdbwd")]
    return out


def default_jobs() -> int:
    """Worker processes by default: the CPU cores less one (the tuner's), at most one per 4 GiB of the
    memory available now (Linux's MemAvailable, which counts the page cache the kernel can drop; elsewhere
    the cores alone)."""
    jobs = max(1, (os.cpu_count() or 2) - 1)
    free = _available_bytes()
    return min(jobs, max(1, free // _WORKER_BYTES)) if free is not None else jobs


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # free pages only (no page cache): an underestimate
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_WORKER: dict = {}


def _init_worker(arch: int, sms: int | None) -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # (set again: the worker compiles, it never interprets)
    import torch

    torch.set_num_threads(1)  # the workers share the cores; their torch ops are the launchers' glue
    cm = compile_only(arch, sms)
    cm.__enter__()  # for the worker's life
    _WORKER["cm"] = cm


def _compile_task(task: tuple) -> tuple:
    """Run one planned call compile-only: (task, seconds, error or None)."""
    import torch

    from opforge.autotune.tuner import _step
    from opforge.kernels import get_op
    from opforge.kernels._triton import allow_tf32

    op_name, case_name, dt, mode, variant, cfg = task
    t0 = time.perf_counter()
    try:
        op = get_op(op_name)
        base = dt.removesuffix("-tf32")
        key = (op_name, case_name, dt, mode)
        with allow_tf32(dt != base):
            if _WORKER.get("key") != key:
                _WORKER.pop("inputs", None)  # one case's inputs at a time
                case = next(c for c in op.cases if c.name == case_name)
                _WORKER["inputs"] = op.make_inputs(case, "cpu", getattr(torch, base), requires_grad=mode == "fwdbwd")
                _WORKER["key"] = key
            problem, args = _WORKER["inputs"]
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            _step(op.variants[variant], problem, args, leaves, None, cfg)  # as the tuner calls it
    except Exception as exc:  # noqa: BLE001 - the tuner meets the same config and records why it fails
        return task, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:300]
    return task, time.perf_counter() - t0, None


def precompile(tasks: list[tuple], jobs: int, arch: int, sms: int | None, log=print) -> dict:
    """Compile the kernels of ``tasks`` (``plan``'s) for ``sm_<arch>`` into Triton's disk cache
    (``TRITON_CACHE_DIR`` or Triton's default, as the caller's) with ``jobs`` worker processes.

    Never raises for a task: a config that does not compile is counted (the tuner records it when it
    meets it), and a pool that breaks (a worker killed) ends the precompile early. Returns ``{"tasks",
    "compiled", "failed", "jobs", "seconds"}``."""
    n = len(tasks)
    jobs = max(0, min(jobs, n))
    summary = {"tasks": n, "compiled": 0, "failed": 0, "jobs": jobs, "seconds": 0.0}
    if jobs == 0:
        return summary
    t0 = time.perf_counter()
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the workers, which import Triton after it is set
    step = max(1, n // 10)
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(arch, sms)) as pool:
            futures = [pool.submit(_compile_task, t) for t in tasks]
            for done, fut in enumerate(as_completed(futures), 1):
                task, _, err = fut.result()
                summary["failed" if err else "compiled"] += 1
                if err and summary["failed"] <= 3:  # the first few, to see why (the tuner logs every one)
                    log(f"    did not compile: {' '.join(map(str, task[:5]))} {task[5]}: {err}")
                if done % step == 0 or done == n:
                    log(f"    precompiled {done}/{n} configs ({time.perf_counter() - t0:.0f} s)")
    except Exception as exc:  # noqa: BLE001 - a broken pool: the tuner compiles what is left itself
        log(f"    precompile stopped ({type(exc).__name__}: {str(exc)[:200]}); the tuner compiles the rest")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"    precompiled {summary['compiled']} of {n} configs' kernels for sm_{arch} in {summary['seconds']} s "
        f"with {jobs} workers ({summary['failed']} did not compile)")
    return summary
