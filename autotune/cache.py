"""The autotune cache: JSON files, one per GPU name + compute capability + Triton major.minor.

File layout (``<tag>.json`` with ``tag`` from :func:`opforge.kernels._triton.device_info`)::

    {"format": 1,
     "device": {"name": ..., "cc": ..., "triton": ...},
     "ops": {"<op>": {"<source hash>": {"<shape key>|<dtype>[|train]": {
         "variant": "dft_gemm", "config": {...},          # the winner
         "torch_ms": 1.9,                                  # torch baseline, same run
         "timings": [{"variant": ..., "config": ..., "ms": ...}, ...]}}}}}

A key ending in ``|train`` was tuned on forward + backward (calls whose tensors
require grad under grad mode); the others on the forward alone. A training
call uses the ``|train`` entry and, when there is none, the forward entry.

Entries live under the op's source hash (kernel source + grid), so editing a
kernel or its grid makes old entries invisible (stale) without deleting them.

Two places are read, the user cache first:

* user cache: ``$OPFORGE_CACHE_DIR`` or ``$XDG_CACHE_HOME/opforge`` or
  ``~/.cache/opforge`` -- written by ``opforge tune`` and ``OPFORGE_AUTOTUNE=1``;
* shipped caches: ``opforge/autotune/caches/`` inside the package.

A user entry shadows the shipped entry for the same key. A corrupt or
unreadable file is reported once with a warning and treated as empty.
Writes replace the file atomically, and ``record`` holds a lock on the
folder from its read to that replace, so processes tuning at once keep
each other's entries.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: records are not locked (see ``_folder_lock``)
    fcntl = None

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "caches"

_memo: dict[str, tuple[tuple, dict]] = {}
_paths_memo: dict[tuple, tuple[str, ...]] = {}


def user_dir() -> Path:
    env = os.environ.get("OPFORGE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "opforge"


def file_name(device: dict) -> str:
    return f"{device['tag']}.json"


def _empty(device: dict | None) -> dict:
    dev = {k: device[k] for k in ("name", "cc", "triton")} if device else {}
    return {"format": FORMAT, "device": dev, "ops": {}}


def is_cache(data) -> bool:
    """Is ``data`` (a parsed JSON document) an opforge autotune cache of this format?"""
    return isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("ops"), dict)


def load(path: Path | str) -> dict:
    """Read a cache file; a missing file is empty, a corrupt one warns and is empty. Memoised on the file's
    inode, modification time and size: a dispatch costs one ``stat`` per file (no pathlib, no parsing), and
    a file replaced by ``save`` (a new inode) is read again even within one tick of the clock."""
    key = os.fspath(path)
    try:
        st = os.stat(key)
    except OSError:
        return _empty(None)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _memo.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not is_cache(data):
            raise ValueError(f"not an opforge cache of format {FORMAT}")
    except (OSError, ValueError) as exc:
        warnings.warn(f"opforge: ignoring unreadable autotune cache {path}: {exc}", RuntimeWarning, stacklevel=2)
        data = _empty(None)
    _memo[key] = (stamp, data)
    return data


def save(path: Path, data: dict) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _memo.pop(str(path), None)


TRAIN = "|train"  # the suffix of an entry tuned on forward + backward


def entry_key(problem, train: bool = False) -> str:
    """``<shape key>|<dtype>``, plus ``|train`` for an entry tuned on forward + backward."""
    key = f"{problem.key}|{problem.dtype_name}"
    return key + TRAIN if train else key


def paths_for(device: dict) -> tuple[str, ...]:
    """Cache files consulted for a device, highest precedence first, as strings: memoised on the device and
    the environment that names the user cache (building paths with pathlib cost more than the rest of a
    lookup, which runs on every CUDA call)."""
    env = (device["tag"], os.environ.get("OPFORGE_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"), SHIPPED_DIR)
    paths = _paths_memo.get(env)
    if paths is None:
        name = file_name(device)
        paths = _paths_memo[env] = (os.fspath(user_dir() / name), os.fspath(SHIPPED_DIR / name))
    return paths


def lookup(op, problem, device: dict | None = None, train: bool = False) -> dict | None:
    """The winning ``{"variant", "config", ...}`` for this call, or None on a miss.

    With ``train`` (the call will be differentiated) a forward + backward entry is preferred in any
    cache file, then the forward entry. Every CUDA call looks up: each file is read once per call (one
    ``stat``, ``load``'s memo) and the shape key formed once."""
    if device is None:
        from opforge.kernels._triton import device_info

        idx = problem.device.index if problem.device.type == "cuda" else None
        device = device_info(idx)
    h = op.source_hash()
    tables = [load(path)["ops"].get(op.name, {}).get(h, {}) for path in paths_for(device)]
    fwd = entry_key(problem)
    for k in ([fwd + TRAIN] if train else []) + [fwd]:
        for table in tables:
            entry = table.get(k)
            if entry is not None:
                return entry
        if _UNSAVED:
            entry = _UNSAVED.get(_unsaved_key(device, op, k))
            if entry is not None:
                return entry
    return None


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock (``flock``) on the cache folder for one read-modify-write, so that processes tuning
    at once (the ranks of a data-parallel job with OPFORGE_AUTOTUNE=1, several ``opforge tune``) keep each
    other's entries: each reads the file after the last one replaced it. Where there is no ``flock``
    (Windows) or the file system refuses it, the record goes ahead unlocked: a lost entry is tuned again."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


# Entries tuned in this process whose cache file could not be written (``record(..., unwritable="memory")``):
# (gpu name, cc, Triton, op, source hash, entry key) -> entry, found by ``lookup`` after the files
_UNSAVED: dict[tuple, dict] = {}
_UNWRITABLE_WARNED: set[str] = set()


def _unsaved_key(device: dict, op, key: str) -> tuple:
    return (device.get("name"), device.get("cc"), device.get("triton"), op.name, op.source_hash(), key)


def record(path: Path, device: dict, op, problem, entry: dict, train: bool = False, unwritable: str = "raise") -> None:
    """Store one tuned entry (read-modify-write under ``_folder_lock``, written atomically); ``train`` for a
    forward + backward entry. ``unwritable="memory"`` (tuning on the spot, OPFORGE_AUTOTUNE=1, inside a
    user's call): a file that cannot be written (a read-only home, a full disk) keeps the entry in this
    process instead, with one warning per file, rather than failing the user's call after the tuning, and
    tuning the same shape again at every later call."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(path.parent):
            data = load(path)
            if not data.get("device"):
                data = {**_empty(device), "ops": data.get("ops", {})}
            data = json.loads(json.dumps(data))  # private copy; the memo stays untouched
            data["ops"].setdefault(op.name, {}).setdefault(op.source_hash(), {})[entry_key(problem, train)] = entry
            save(path, data)
    except OSError as exc:
        if unwritable != "memory":
            raise
        _UNSAVED[_unsaved_key(device, op, entry_key(problem, train))] = entry
        if str(path) not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add(str(path))
            warnings.warn(f"opforge: cannot write the autotune cache {path} ({exc.strerror or exc}); the shapes "
                          f"tuned on the spot are kept in this process only: point OPFORGE_CACHE_DIR at a "
                          f"writable folder to keep them", RuntimeWarning, stacklevel=2)
