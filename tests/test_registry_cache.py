"""Registry dispatch, backend overrides and the autotune cache (miss, hit, stale hash, corrupt file, atomic write)."""
import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import opforge.kernels as K
from opforge.autotune import cache, tuner
from opforge.kernels import get_op, registered_ops, use_backend
from opforge.kernels._triton import device_info

OP = get_op("spectral_conv")
CASE = next(c for c in OP.cases if c.name == "1d-small-odd")


def problem():
    return OP.make_inputs(CASE, "cpu", torch.float32)


def test_registered_ops_lists_variants():
    ops = registered_ops()
    assert ops["spectral_conv"][0] == "torch"
    assert {"dft_gemm", "fft_mix"} <= set(ops["spectral_conv"])
    with pytest.raises(ValueError, match="registered"):
        get_op("nope")


@pytest.mark.parametrize("value, on", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True),
                                       ("true", None), ("yes", None), ("2", None)])
def test_autotune_env_is_0_or_1(monkeypatch, value, on):
    """OPFORGE_AUTOTUNE=true used to leave tuning off without a word; values other than 0 and 1 now raise."""
    from opforge.kernels._registry import autotune_on

    if value is None:
        monkeypatch.delenv("OPFORGE_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("OPFORGE_AUTOTUNE", value)
    if on is None:
        with pytest.raises(ValueError, match=f"OPFORGE_AUTOTUNE='{value}' is not a setting"):
            autotune_on()
    else:
        assert autotune_on() is on


def test_cpu_auto_goes_to_torch():
    p, _ = problem()
    v, cfg, why = OP.select(p)
    assert v.name == "torch" and why == "cpu"


def test_env_backend_and_unknown_names(monkeypatch):
    p, _ = problem()
    monkeypatch.setenv("OPFORGE_BACKEND", "torch")
    assert OP.select(p)[0].name == "torch"
    monkeypatch.setenv("OPFORGE_BACKEND", "triton")
    assert OP.select(p)[0].kind == "triton"
    monkeypatch.setenv("OPFORGE_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="valid.*auto.*torch.*triton"):
        OP.select(p)
    with pytest.raises(ValueError, match="valid"):
        with use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="dft_gemm"):
        with use_backend("triton", spectral_conv="nope"):
            pass


def test_context_manager_beats_env(monkeypatch):
    p, _ = problem()
    monkeypatch.setenv("OPFORGE_BACKEND", "triton")
    with use_backend("torch"):
        assert OP.select(p)[0].name == "torch"
    with use_backend("auto", spectral_conv="fft_mix"):
        assert OP.select(p)[0].name == "fft_mix"


def test_triton_without_interpreter_or_gpu_is_a_clear_error(monkeypatch):
    p, _ = problem()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"):
        with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET=1"):
            OP.select(p)
    with use_backend("auto", spectral_conv="dft_gemm"):
        with pytest.raises(ValueError, match="cannot run here"):
            OP.select(p)


def test_float64_cannot_go_to_triton():
    p, _ = OP.make_inputs(CASE, "cpu", torch.float64)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="float64 runs on torch"):
            OP.select(p)


def _user_cache_file():
    return cache.user_dir() / cache.file_name(device_info())


def test_cache_miss_hit_stale_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path))
    p, _ = problem()
    with use_backend("triton"):
        v, cfg, why = OP.select(p)
        assert why == "heuristic" and v.name == OP.triton_variants()[0].name
        assert cfg == v.default_config(p)
        # a hit for fft_mix with a specific config
        entry = {"variant": "fft_mix", "config": {"MIX_R": 16, "MIX_O": 32, "MIX_S": 16, "num_warps": 4},
                 "ms": 1.0, "torch_ms": 2.0, "timings": []}
        cache.record(_user_cache_file(), device_info(), OP, p, entry)
        v, cfg, why = OP.select(p)
        assert (v.name, cfg["MIX_S"], why) == ("fft_mix", 16, "cache")
        # stale: the same entry under another source hash is invisible
        data = json.loads(_user_cache_file().read_text())
        data["ops"]["spectral_conv"] = {"0000stale0000000": data["ops"]["spectral_conv"][OP.source_hash()]}
        cache.save(_user_cache_file(), data)
        assert OP.select(p)[2] == "heuristic"
        # corrupt: a warning, then the heuristic
        _user_cache_file().write_text("{not json")
        os.utime(_user_cache_file(), (1, 1))
        with pytest.warns(RuntimeWarning, match="unreadable autotune cache"):
            assert OP.select(p)[2] == "heuristic"


def test_timed_configs_are_used_when_the_winner_is_not_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path))
    p, _ = problem()
    slow = {"MIX_R": 32, "MIX_O": 64, "MIX_S": 32, "num_warps": 4}
    fast = {"MIX_R": 16, "MIX_O": 32, "MIX_S": 16, "num_warps": 4}
    entry = {"variant": "torch", "config": None, "ms": 1.0, "torch_ms": 1.0,
             "timings": [{"variant": "fft_mix", "config": slow, "ms": 3.0},
                         {"variant": "fft_mix", "config": fast, "ms": 2.0}]}
    cache.record(_user_cache_file(), device_info(), OP, p, entry)
    with use_backend("triton"):  # torch won, but is not allowed: the fastest timed Triton config is
        v, cfg, why = OP.select(p)
    assert (v.name, cfg, why) == ("fft_mix", fast, "cache")
    assert OP.config_for(OP.variants["fft_mix"], p) == fast  # what run_variant and pins use
    assert OP.config_for(OP.variants["dft_gemm"], p) == OP.variants["dft_gemm"].default_config(p)


def test_user_cache_shadows_shipped(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(cache, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path / "user"))
    p, _ = problem()
    dev = device_info()
    cache.record(shipped / cache.file_name(dev), dev, OP, p, {"variant": "fft_mix", "config": None})
    assert cache.lookup(OP, p)["variant"] == "fft_mix"
    cache.record(cache.user_dir() / cache.file_name(dev), dev, OP, p, {"variant": "dft_gemm", "config": None})
    assert cache.lookup(OP, p)["variant"] == "dft_gemm"


def test_lookup_sees_files_written_by_another_process(tmp_path, monkeypatch):
    """Lookups are memoised on each file's modification time and size, and on the cache folder named by
    the environment: a file rewritten behind the memo's back (another process's tune) or a new
    OPFORGE_CACHE_DIR is seen at the next call."""
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path / "a"))
    p, _ = problem()
    dev = device_info()
    path = cache.user_dir() / cache.file_name(dev)
    cache.record(path, dev, OP, p, {"variant": "fft_mix", "config": None})
    assert cache.lookup(OP, p)["variant"] == "fft_mix"
    data = json.loads(path.read_text())
    data["ops"]["spectral_conv"][OP.source_hash()][cache.entry_key(p)]["variant"] = "dft_gemm"
    path.write_text(json.dumps(data))  # not through save(): the memo is not told
    assert cache.lookup(OP, p)["variant"] == "dft_gemm"
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path / "b"))
    assert cache.lookup(OP, p) is None


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / "c.json"
    cache.save(path, {"format": cache.FORMAT, "device": {}, "ops": {}})
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]
    assert cache.load(path)["ops"] == {}


def test_failed_save_keeps_the_old_file_and_no_temp_file(tmp_path):
    """A write that fails part way (here: a value JSON cannot hold) leaves the previous cache as it was."""
    path = tmp_path / "c.json"
    good = {"format": cache.FORMAT, "device": {}, "ops": {"spectral_conv": {}}}
    cache.save(path, good)
    with pytest.raises(TypeError):
        cache.save(path, {"format": cache.FORMAT, "device": {}, "ops": {"x": object()}})
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]
    assert json.loads(path.read_text()) == good


class _FakeOp:
    name = "spectral_conv"

    @staticmethod
    def source_hash():
        return "h"


class _FakeProblem:
    dtype_name = "float32"

    def __init__(self, key):
        self.key = key


def _record_many(path, dev, worker, n):
    for i in range(n):
        cache.record(path, dev, _FakeOp, _FakeProblem(f"w{worker}-{i}"), {"variant": "fft_mix", "config": None})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks writer processes")
def test_concurrent_records_keep_every_entry(tmp_path):
    """Processes tuning at once into one cache (ranks of a data-parallel job with OPFORGE_AUTOTUNE=1, or
    several `opforge tune`) each read, add their entry and replace the file: each record holds a lock on
    the cache folder while it does, so no process writes over an entry another has just added."""
    import multiprocessing

    path, dev, workers, n = tmp_path / "c.json", device_info(), 6, 25
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(path, dev, w, n)) for w in range(workers)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
    assert all(pr.exitcode == 0 for pr in procs)
    keys = cache.load(path)["ops"]["spectral_conv"]["h"]
    missing = {f"w{w}-{i}|float32" for w in range(workers) for i in range(n)} - set(keys)
    assert not missing, f"{len(missing)} of {workers * n} entries lost"
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]


def test_a_json_file_of_another_format_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": cache.FORMAT + 1, "ops": {}}))
    with pytest.warns(RuntimeWarning, match=f"not an opforge cache of format {cache.FORMAT}"):
        assert cache.load(path)["ops"] == {}


def test_user_cache_folder(monkeypatch, tmp_path):
    """OPFORGE_CACHE_DIR, else $XDG_CACHE_HOME/opforge, else ~/.cache/opforge."""
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.user_dir() == tmp_path / "mine"
    monkeypatch.delenv("OPFORGE_CACHE_DIR")
    assert cache.user_dir() == tmp_path / "xdg" / "opforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.user_dir() == tmp_path / "home" / ".cache" / "opforge"


def test_source_hash_changes_with_grid(monkeypatch):
    h = OP.source_hash()
    v = OP.variants["fft_mix"]
    monkeypatch.setattr(v, "configs", lambda p: [{"MIX_R": 64, "MIX_O": 64, "MIX_S": 64}])
    monkeypatch.setattr(OP, "_hash", None)
    assert OP.source_hash() != h
    monkeypatch.setattr(OP, "_hash", None)


def test_an_unwritable_cache_keeps_on_the_spot_entries_in_the_process(tmp_path, monkeypatch):
    """Tuning on the spot (OPFORGE_AUTOTUNE=1, inside a user's call: ``unwritable="memory"``) into a cache that
    cannot be written (a read-only home, a full disk) warns once per file and keeps the entry for this
    process's later lookups, instead of failing the user's call after the tuning and tuning that shape again
    at every call; elsewhere (``opforge tune``) the write error stands."""
    monkeypatch.setattr(cache, "_UNSAVED", {})
    monkeypatch.setattr(cache, "_UNWRITABLE_WARNED", set())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path, dev = blocker / "c.json", device_info()  # (its folder is a file: mkdir fails)
    p, _ = problem()
    entry = {"variant": "fft_mix", "config": {"BLOCK": 1}, "ms": 1.0, "timings": []}
    with pytest.raises(OSError):
        cache.record(path, dev, OP, p, entry)
    assert cache.lookup(OP, p, device=dev) is None
    with pytest.warns(RuntimeWarning, match="cannot write the autotune cache .*kept in this process only"):
        cache.record(path, dev, OP, p, entry, unwritable="memory")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (one warning per file)
        cache.record(path, dev, OP, p, dict(entry, ms=2.0), train=True, unwritable="memory")
    assert cache.lookup(OP, p, device=dev) == entry
    assert cache.lookup(OP, p, device=dev, train=True)["ms"] == 2.0
    assert cache.lookup(OP, p, device=dict(dev, name="another GPU")) is None


def test_tuner_on_interpreter_writes_entry(tmp_path):
    """The tuner times every config (here through the interpreter), checks each result and persists the winner."""
    p, args = problem()
    out = tmp_path / "tuned.json"
    entry = tuner.tune_problem(OP, p, args, persist=True, path=out)
    assert entry["torch_ms"] > 0
    timed = {t["variant"] for t in entry["timings"]}
    assert timed == {"dft_gemm", "fft_mix"} and not entry["failures"]
    stored = json.loads(out.read_text())["ops"]["spectral_conv"][OP.source_hash()]
    assert stored[cache.entry_key(p)]["variant"] == entry["variant"]


def _grad_problem():
    return OP.make_inputs(CASE, "cpu", torch.float32, requires_grad=True)


def test_tuner_train_mode_times_forward_and_backward(tmp_path):
    """train=True times forward + backward, checks the gradients too and stores the entry under '|train'."""
    p, args = _grad_problem()
    out = tmp_path / "tuned.json"
    entry = tuner.tune_problem(OP, p, args, persist=True, path=out, train=True)
    assert entry["mode"] == "fwdbwd" and not entry["failures"]
    assert {t["variant"] for t in entry["timings"]} == {"dft_gemm", "fft_mix"}
    stored = json.loads(out.read_text())["ops"]["spectral_conv"][OP.source_hash()]
    assert set(stored) == {cache.entry_key(p, train=True)} and cache.entry_key(p, True).endswith("|train")
    assert all(a.grad is None for a in args)  # the tuner differentiates with autograd.grad, leaving .grad alone
    with pytest.raises(ValueError, match="require grad"):
        tuner.tune_problem(OP, *problem(), persist=False, train=True)


def test_tuner_without_a_timed_baseline_screens_against_the_triton_default(tmp_path, monkeypatch):
    """Where the torch variant would take minutes (op.baseline_skip), the tuner never runs it: configs are
    checked against the first Triton variant at its default config and the entry says so."""
    p, args = _grad_problem()
    monkeypatch.setattr(OP, "baseline_skip", lambda problem: "too slow here")

    def no_torch(*a, **k):
        raise AssertionError("the torch variant ran")

    monkeypatch.setattr(OP.torch_variant, "run", no_torch)
    for v in OP.triton_variants():  # two configs each keep the interpreter run short
        monkeypatch.setattr(v, "configs", lambda problem, v=v, c=v.configs: c(problem)[:2])
    for train in (False, True):
        entry = tuner.tune_problem(OP, p, args, persist=True, path=tmp_path / "t.json", train=train)
        assert entry["torch_ms"] is None and entry["variant"] in {"dft_gemm", "fft_mix"}
        assert "too slow here" in entry["baseline"] and not entry["failures"]
    rows = tuner.tune_op(OP, [CASE], "cpu", torch.float32, out=tmp_path / "t.json", stream=io.StringIO(),
                         modes=("fwd",))
    assert all(r["torch_ms"] is None and r["speedup"] is None for r in rows)


def test_tuner_times_each_default_first_even_outside_the_grid(tmp_path, monkeypatch):
    """What a cache miss runs is timed first, so a winner has always been compared with it (dft_gemm's default
    mixing tile is not in its grid on some cases), and a run cut short by SIGINT (a time limit) keeps what it
    timed, marked partial, before it stops."""
    p, args = problem()
    for v in OP.triton_variants():  # two configs each keep the interpreter run short
        monkeypatch.setattr(v, "configs", lambda problem, v=v, c=v.configs: c(problem)[:2])
    dft = OP.variants["dft_gemm"]
    outside = dict(dft.default_config(p), MIX_S=64)
    assert outside not in dft.configs(p)
    monkeypatch.setattr(dft, "default_config", lambda problem: outside)
    calls = tuner._calls(OP, p)
    defaults = [(v.name, v.default_config(p)) for v in OP.triton_variants()]
    assert [(v.name, c) for v, c in calls[:2]] == defaults
    assert len(calls) == 2 + 2 + 1  # fft_mix's default is in its first two configs; dft_gemm's is not
    assert [c for v, c in calls[2:] if v.name == "dft_gemm"] == dft.configs(p)
    entry = tuner.tune_problem(OP, p, args, persist=False)
    assert [(t["variant"], t["config"]) for t in entry["timings"]] != [] and not entry["failures"]
    assert {(t["variant"], json.dumps(t["config"])) for t in entry["timings"]} == {
        (v.name, json.dumps(c)) for v, c in calls}

    # interrupted at the third config: the two defaults were timed and the entry is kept
    real_bench, n = tuner.bench, []

    def bench(fn, device, *a, **k):
        n.append(1)
        if len(n) == 4:  # the torch baseline, the two defaults, then SIGINT
            raise KeyboardInterrupt
        return real_bench(fn, device, *a, **k)

    monkeypatch.setattr(tuner, "bench", bench)
    out = tmp_path / "t.json"
    with pytest.raises(KeyboardInterrupt):
        tuner.tune_problem(OP, p, args, persist=True, path=out)
    stored = json.loads(out.read_text())["ops"]["spectral_conv"][OP.source_hash()][cache.entry_key(p)]
    assert [(t["variant"], t["config"]) for t in sorted(stored["timings"], key=lambda t: t["variant"])] == sorted(
        defaults)
    assert stored["partial"] == "interrupted with 3 of 5 configs untimed (the defaults first)"


@pytest.mark.parametrize("op_name, case_name, toggled", [
    ("kan", "rbf-small-odd", None),  # the grid's pairs that differ in fused's grad-x block alone
    ("kan", "bspline-small-odd", {"SPLITS": 2}),
    ("kernel_sum", "small-d24-r16-gaussian", {"GRAD_SPLIT_D": 1, "GRAD_B_FUSED": 0}),
])
def test_train_keys_leave_the_forward_alone(op_name, case_name, toggled):
    """A forward-only tuning times one config of each group that differs only in a variant's ``train_keys``
    (``Variant.tuning_configs(train=False)``, the default's group led by the default); training tunings time
    them all. That is sound only if those keys never reach the forward: each left-out config's forward, run
    under the interpreter, matches its group's timed one bit for bit (and so does the default with the keys
    set otherwise)."""
    op = get_op(op_name)
    case = next(c for c in op.cases if c.name == case_name)
    p, args = op.make_inputs(case, "cpu", torch.float32)
    checked = 0
    for v in op.triton_variants():
        if not v.train_keys or v.why_not(p):
            continue
        full, fwd = v.tuning_configs(p), v.tuning_configs(p, train=False)
        assert fwd[0] == full[0] == v.default_config(p) and all(c in full for c in fwd)

        def forward_of(c):
            return tuple(sorted((k, val) for k, val in c.items() if k not in v.train_keys))

        assert len({forward_of(c) for c in fwd}) == len(fwd) == len({forward_of(c) for c in full})
        pairs = [(c, next(r for r in fwd if forward_of(r) == forward_of(c))) for c in full if c not in fwd]
        if toggled is None:
            assert pairs  # (the grid has such configs: else this case tests nothing)
        else:
            pairs = [(dict(full[0], **toggled), full[0])]
        for left_out, timed in pairs:
            with torch.no_grad():
                a, b = v.run(p, *args, config=left_out), v.run(p, *args, config=timed)
            assert torch.equal(a, b), (left_out, timed)
            checked += 1
    assert checked


def test_kernel_sum_baseline_is_untimed_only_for_huge_gpu_problems():
    from opforge.kernels.kernel_sum import Problem as KP

    def kp(n, dev):
        return KP(1, n, n, 3, 1, "gaussian", torch.float32, torch.device(dev))

    ks = get_op("kernel_sum")
    assert ks.baseline_skip(kp(10**6, "cuda")) and "2^34" in ks.baseline_skip(kp(10**6, "cuda"))
    assert ks.baseline_skip(kp(10**5, "cuda")) is None and ks.baseline_skip(kp(10**6, "cpu")) is None


class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_tuner_rejects_a_config_with_a_wrong_backward(tmp_path, monkeypatch):
    """A variant whose forward is right and backward wrong passes forward tuning but fails train tuning."""
    p, args = _grad_problem()
    v = OP.variants["fft_mix"]
    run = v.run
    monkeypatch.setattr(v, "run", lambda *a, **k: _DoubleGrad.apply(run(*a, **k)))
    entry = tuner.tune_problem(OP, p, args, persist=False, train=True)
    bad = [f for f in entry["failures"] if f["variant"] == "fft_mix"]
    assert bad and all("wrong result or gradient" in f["error"] for f in bad)
    assert "fft_mix" not in {t["variant"] for t in entry["timings"]}
    fwd = tuner.tune_problem(OP, *problem(), persist=False)
    assert "fft_mix" in {t["variant"] for t in fwd["timings"]}


def test_tuner_skips_a_config_that_raises_and_says_why(monkeypatch):
    """A config that fails to compile or launch (on a GPU: more shared memory than a block may have) is
    recorded as a failure with its error and skipped; the others are timed and one of them wins. Where the
    torch baseline is not timed, every config failing, or no Triton variant running, is an error that says so
    (not an entry without a winner)."""
    p, args = problem()
    v = OP.variants["fft_mix"]
    cfgs = v.tuning_configs(p)
    assert len(cfgs) >= 2
    bad = cfgs[-1]
    run = v.run

    def flaky(problem, *a, config=None):
        if config == bad:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return run(problem, *a, config=config)

    monkeypatch.setattr(v, "run", flaky)
    entry = tuner.tune_problem(OP, p, args, persist=False)
    failed = [f for f in entry["failures"] if f["variant"] == "fft_mix"]
    assert [f["config"] for f in failed] == [bad] and "RuntimeError: out of resource" in failed[0]["error"]
    timed = [t["config"] for t in entry["timings"] if t["variant"] == "fft_mix"]
    assert len(timed) == len(cfgs) - 1 and bad not in timed
    monkeypatch.setattr(OP, "baseline_skip", lambda problem: "too slow here")
    monkeypatch.setattr(tuner, "_calls", lambda op, problem, train=True: [(v, bad)])
    with pytest.raises(RuntimeError, match="every config failed and the torch baseline is not timed here"):
        tuner.tune_problem(OP, p, args, persist=False)
    monkeypatch.setattr(OP, "triton_variants", lambda: [])
    with pytest.raises(ValueError, match="no Triton variant runs .* torch baseline is not timed here"):
        tuner.tune_problem(OP, p, args, persist=False)


def test_training_calls_use_the_train_entry_then_the_forward_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("OPFORGE_CACHE_DIR", str(tmp_path))
    p, args = _grad_problem()
    cfg_f = {"MIX_R": 16, "MIX_O": 32, "MIX_S": 16, "num_warps": 4}
    fwd = {"variant": "fft_mix", "config": cfg_f, "ms": 1.0, "torch_ms": 2.0,
           "timings": [{"variant": "fft_mix", "config": cfg_f, "ms": 1.0}]}
    cache.record(_user_cache_file(), device_info(), OP, p, fwd)
    with use_backend("triton"):
        assert OP.select(p, args)[0].name == "fft_mix"  # no train entry: the forward one
        cfg_t = OP.variants["dft_gemm"].configs(p)[-1]
        train = {"variant": "dft_gemm", "config": cfg_t, "ms": 3.0, "torch_ms": 4.0,
                 "timings": [{"variant": "dft_gemm", "config": cfg_t, "ms": 3.0}]}
        cache.record(_user_cache_file(), device_info(), OP, p, train, train=True)
        assert OP.select(p, args)[:3] == (OP.variants["dft_gemm"], cfg_t, "cache")
        with torch.no_grad():  # not differentiated: the forward entry
            assert OP.select(p, args)[0].name == "fft_mix"
        assert OP.select(p, tuple(a.detach() for a in args))[0].name == "fft_mix"
    assert OP.config_for(OP.variants["dft_gemm"], p, train=True) == cfg_t  # what run_variant uses for training


def test_import_is_light():
    """Importing opforge.kernels probes no device and tunes nothing (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, opforge.kernels; "
            "assert 'opforge.autotune.tuner' not in sys.modules; "
            "from opforge.kernels._triton import device_info; assert device_info.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert K.HAS_TRITON


@pytest.mark.parametrize("op_name", ["spectral_conv", "kernel_sum", "kan"])
def test_grid_configs_compute_the_same(op_name):
    """First, middle and last config of every Triton variant's grid agree with the torch variant."""
    op = get_op(op_name)
    for case in [c for c in op.cases if "small" in c.tags][:2]:
        p, args = op.make_inputs(case, "cpu", torch.float32)
        want = op.run_variant("torch", p, *args)
        for v in op.triton_variants():
            grid = v.configs(p)
            for cfg in {0: grid[0], 1: grid[len(grid) // 2], 2: grid[-1]}.values():
                got = op.run_variant(v.name, p, *args, config=cfg)
                torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5, msg=f"{v.name} {cfg}")


def test_auto_dispatch_falls_back_to_torch_with_a_warning(monkeypatch):
    """A Triton variant that raises under backend=auto (say, a config that does not compile on this GPU)
    warns once and the call is served by torch; forcing triton shows the error."""
    p, args = problem()
    want = OP.run_variant("torch", p, *args)
    v = OP.triton_variants()[0]

    def boom(*a, **k):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(v, "run", boom)
    monkeypatch.setattr(OP, "_broken", set())
    monkeypatch.setattr(OP, "select", lambda problem, args=(): (v, None, "heuristic"))
    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        torch.testing.assert_close(OP(p, *args), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(OP(p, *args), want)  # remembered: no second try, no second warning
    with use_backend("triton"):
        with pytest.raises(RuntimeError, match="out of shared memory"):
            OP(p, *args)


def test_shipped_caches_hold_no_stale_entries():
    """autotune/caches/README.md: stale entries are removed, not shipped. Every op hash in a shipped file is
    the op's current source hash (a kernel edit must prune or retune them), and every entry names a
    registered variant."""
    files = sorted(cache.SHIPPED_DIR.glob("*.json"))
    for path in files:
        data = json.loads(path.read_text())
        for op_name, by_hash in data["ops"].items():
            op = get_op(op_name)
            assert set(by_hash) == {op.source_hash()}, f"{path.name}: stale {op_name} entries {set(by_hash)}"
            for key, entry in by_hash[op.source_hash()].items():
                assert entry["variant"] in op.variants, f"{path.name} {key}: unknown variant {entry['variant']}"


def test_source_hash_is_the_same_under_the_interpreter():
    """Triton functions hash the same source (JITFunction.src) whether TRITON_INTERPRET is set or not, so
    interpreter runs see the entries tuned on a GPU."""
    code = ("import opforge.kernels as k; "
            "print([k.get_op(n).source_hash() for n in ('spectral_conv', 'kan', 'kernel_sum')])")
    out = set()
    for flag in ("0", "1"):
        env = dict(os.environ, TRITON_INTERPRET=flag)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out.add(r.stdout.strip())
    assert len(out) == 1, out


@pytest.mark.parametrize("op_name,huge", [
    # full spectra past 2^31 floats: fft_mix only (dft_gemm keeps the modes apart)
    ("spectral_conv", {"batch": 64, "grid": (4096, 4096), "out_grid": (4096, 4096)}),
    ("spectral_conv", {"batch": 1 << 28}),          # the kept modes too: both variants
    ("kan", {"rows": 1 << 26}),                     # x [2^26, 7]: fits
    ("kan", {"rows": 1 << 29}),                     # x [2^29, 7]: staged only (it slices the rows into blocks)
    ("kan", {"cin": 1 << 17}),                      # feature blocks past the grid's second dimension
    ("kernel_sum", {"n": 1 << 30}),
    ("kernel_sum", {"batch": 1 << 17}),             # past CUDA's 65535 on the grid's second dimension
])
def test_sizes_past_32_bit_offsets_go_to_torch(op_name, huge):
    """Kernels index with 32-bit offsets where no realistic size needs more, and launch on grid dimensions CUDA
    caps at 65535: past either a variant says it cannot run (dispatch takes the torch variant; forcing Triton
    raises) instead of wrapping around or failing at launch."""
    import dataclasses

    op = get_op(op_name)
    case = next(c for c in op.cases if "small" in c.tags and c.name != "1d-small-odd")  # 2-D spectral
    p, args = op.make_inputs(case, "cpu", torch.float32)
    big = dataclasses.replace(p, **huge)
    reasons = {v.name: v.why_not(big) for v in op.triton_variants()}
    fits = all(r is None for r in reasons.values())
    if huge == {"rows": 1 << 26}:  # a KAN input [2^26, 7] fits: nothing refused
        assert fits, reasons
        return
    assert not fits, reasons
    for name, r in reasons.items():
        if r is not None:
            assert "2^31 - 1" in r or "65535" in r, r
    if huge == {"rows": 1 << 29}:
        assert reasons["staged"] is None and "2^31 - 1" in reasons["fused"], reasons
    if op_name == "spectral_conv" and "grid" in huge:
        assert reasons["dft_gemm"] is None and "spectrum" in reasons["fft_mix"]
    if all(r is not None for r in reasons.values()):
        with use_backend("triton"), pytest.raises(ValueError, match="no Triton variant"):
            op.select(big)
        on_gpu = dataclasses.replace(big, device=torch.device("cuda"))  # what a CUDA call of that size gets
        with use_backend("auto"):
            v, _, why = op.select(on_gpu)
        assert (v.name, why) == ("torch", "no triton variant supports the call")


def test_wide_views_are_copied_for_32_bit_offsets():
    """A narrow view of a tensor wider than 2^31 elements reaches past 32-bit offsets though it holds few:
    the KAN launcher takes a contiguous copy (the storage is reserved, never touched)."""
    from opforge.kernels._triton import INT32_MAX, max_offset, within_int32

    base = torch.empty(INT32_MAX + 4, dtype=torch.uint8)
    view = base.as_strided((2, 3), (INT32_MAX + 1, 1))
    assert max_offset(view) == INT32_MAX + 3 and not view.is_contiguous()
    copy = within_int32(view)
    assert copy.is_contiguous() and torch.equal(copy, view)
    small = torch.zeros(4, 6)[:, :3]
    assert within_int32(small) is small


# launch heuristics, not kernel semantics: a changed default config or SM count leaves every timed config valid
_UNHASHED = ("_default", "_sm_count")


def _code_of(obj) -> list:
    import types

    if hasattr(getattr(obj, "fn", None), "__code__"):  # a Triton JITFunction
        return [obj.fn.__code__]
    if isinstance(obj, staticmethod):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, types.FunctionType):
        return [obj.__code__]
    if isinstance(obj, type):  # its own methods (not nested classes: autograd's _backward_cls points back)
        return [c for v in vars(obj).values() if not isinstance(v, type) for c in _code_of(v)]
    return []


def _names(code) -> set:
    import types

    return set(code.co_names).union(*[_names(c) for c in code.co_consts if isinstance(c, types.CodeType)])


@pytest.mark.parametrize("op_name", sorted(registered_ops()))
def test_source_hash_covers_every_helper_a_variant_calls(op_name):
    """A variant's ``sources`` (its op's source hash, which scopes cached timings and flags results of changed
    code) must hold every private function and class of its module that it reaches: the spectral torch
    variant once hashed only _torch_run, so an edit of its mix marked nothing stale."""
    import importlib

    op = get_op(op_name)
    mod = importlib.import_module(f"opforge.kernels.{op_name}")
    for v in op.variants.values():
        seen, todo = [], list(v.sources)
        while todo:
            obj = todo.pop()
            if any(obj is s for s in seen):
                continue
            seen.append(obj)
            for name in set().union(*[_names(c) for c in _code_of(obj)]):
                target = getattr(mod, name, None)
                home = getattr(getattr(target, "fn", target), "__module__", None)
                if (name.startswith("_") and not name.startswith("__") and not name.isupper() and target is not None
                        and home == mod.__name__ and not name.endswith(_UNHASHED)):
                    todo.append(target)
        missing = sorted({getattr(getattr(o, "fn", o), "__name__", repr(o)) for o in seen
                          if not any(o is s for s in v.sources)})
        assert not missing, f"{op_name} variant {v.name!r} reaches {missing}, which its sources= leave out"


@pytest.mark.parametrize("op_name", sorted(registered_ops()))
def test_torch_variants_run_in_deterministic_mode(op_name):
    """Under torch.use_deterministic_algorithms(True), where ops without a deterministic implementation
    raise, every op's torch variant runs its small cases forward and backward, with the same results."""
    op = get_op(op_name)
    for case in [c for c in op.cases if "small" in c.tags]:
        runs = []
        for det in (False, True):
            p, args = op.make_inputs(case, "cpu", torch.float32, requires_grad=True, seed=1)
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            torch.use_deterministic_algorithms(det)
            try:
                y = op.run_variant("torch", p, *args)
                runs.append([y, *torch.autograd.grad(y.sum(), leaves)])
            finally:
                torch.use_deterministic_algorithms(False)
        for a, b in zip(*runs):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{op_name} {case.name}")


def _triton_variants_agree_on_small_cases(op_name, fence=lambda t: t):
    """Each Triton variant's small cases of ``op_name``, forward and every gradient, finite and equal to the
    torch variant's on the same inputs (each input and the incoming gradient passed through ``fence``)."""
    op = get_op(op_name)
    for case in [c for c in op.cases if "small" in c.tags]:
        p, args = op.make_inputs(case, "cpu", torch.float32, requires_grad=True, seed=1)
        args = tuple(fence(a) if isinstance(a, torch.Tensor) else a for a in args)
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        want = op.run_variant("torch", p, *args)
        g = fence(torch.randn(want.shape, generator=torch.Generator().manual_seed(2)))
        want = [want.detach(), *torch.autograd.grad(want, leaves, g)]
        for v in op.triton_variants():
            if v.why_not(p):
                continue
            y = op.run_variant(v.name, p, *args)
            got = [y.detach(), *torch.autograd.grad(y, leaves, g)]
            for i, (a, b) in enumerate(zip(got, want)):
                assert torch.isfinite(a).all(), f"{op_name} {v.name} {case.name}: output {i} not finite"
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-6,
                                           msg=f"{op_name} {v.name} {case.name} output {i}")


@pytest.mark.parametrize("op_name", sorted(registered_ops()))
def test_triton_variants_read_no_uninitialised_memory(op_name):
    """On a CPU, fresh memory is mostly zeros, so a kernel that read an output or padding buffer it had not
    written (``torch.empty``) would still pass the interpreter tests, and read garbage on a GPU. With
    ``torch.utils.deterministic.fill_uninitialized_memory`` every ``empty`` is filled with NaN instead, and
    each Triton variant still agrees with the torch variant (checked by skipping half of fft_mix's zero fill)."""
    import torch.utils.deterministic as det

    filled = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all()  # the setting is in force
        _triton_variants_agree_on_small_cases(op_name)
    finally:
        det.fill_uninitialized_memory = filled
        torch.use_deterministic_algorithms(False)


def _nan_fenced(t: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """``t``'s values in the middle of a buffer whose other elements are NaN (a view of it, a leaf when ``t``
    requires grad): a kernel reading past either end of the tensor reads NaN."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    buf[pad:pad + t.numel()] = t.detach().reshape(-1)
    return buf[pad:pad + t.numel()].view(t.shape).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("op_name", sorted(registered_ops()))
def test_triton_variants_read_nothing_past_their_inputs(op_name):
    """The interpreter does not bounds-check a load (neither does a GPU, short of compute-sanitizer): with
    every input and the incoming gradient between NaN fences, each Triton variant still agrees with the torch
    variant (checked by dropping the KAN forward's feature mask on x)."""
    _triton_variants_agree_on_small_cases(op_name, _nan_fenced)
