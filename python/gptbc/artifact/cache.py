"""The artifact cache: one content-addressed store for everything gptbc makes that is slow to make again.

Each entry is a folder `ROOT/KIND/KEY/` where KEY is a hash of everything the artifact depends on (the caller
lists it: model config, scheme, target, options, source hashes, versions), so a changed input is a new entry and
an entry is never stale. Inside: the artifact's files and `entry.json` (the key's parts, when and how long it was
built, and each file's size, mtime and, for files up to `HASHED_BYTES`, sha256).

- An entry appears atomically: built in `.KEY.tmp-*` beside it and renamed into place, so a killed build leaves
  no entry (its temporary folder is removed by the next build of that key, or by `prune`/`clear`).
- Concurrent processes wanting the same entry wait on `.KEY.lock` (flock, released by the kernel when a process
  dies) instead of building it twice.
- An entry whose files no longer match `entry.json` is damaged: it is removed and built again.
- Each use touches `.used`, so `gptbc cache list` shows the last use and `prune` evicts the least recently used.

ROOT is GPTBC_CACHE_DIR, else the platform's cache folder (XDG_CACHE_HOME or ~/.cache on Linux,
~/Library/Caches on macOS) + /gptbc. Why not a library (diskcache, joblib.Memory): they store values, not folders
of files other programs open by path (a library for dlopen, weights for the C++ runner), and neither locks a build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from gptbc.errors import GptbcError, raise_if_interrupted

ENTRY_FILE = "entry.json"
USED_FILE = ".used"
HASHED_BYTES = 64 << 20  # files up to this size are checked by sha256 on every use; larger ones by size and mtime
# kind → what one entry of it is called in the lines the cache prints
KINDS = {"libraries": "library", "weights": "weights", "native": "native build", "wheels": "wheels",
         "webgpu": "webgpu runtime", "ccl": "ccl library"}


def cache_root() -> Path:
    """GPTBC_CACHE_DIR, else the platform's user cache folder + /gptbc."""
    named = os.environ.get("GPTBC_CACHE_DIR")
    if named:
        return Path(named).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "gptbc"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "gptbc"
    return Path.home() / ".cache" / "gptbc"


def cache_disabled() -> bool:
    """GPTBC_NO_CACHE=1: build every artifact anew (nothing read from or written to the cache)."""
    return os.environ.get("GPTBC_NO_CACHE", "").lower() in ("1", "true", "yes", "on")


def key_of(parts: dict[str, Any]) -> str:
    """The entry key of `parts` (JSON-serializable): 32 hex digits of the sha256 of their canonical JSON."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sources_hash(*paths: Path, pattern: str = "*.py") -> str:
    """A hash of the files matching `pattern` under each folder in `paths` (and of each file named), names and
    bytes: the key part that makes a changed compiler, converter or native source build anew."""
    digest = hashlib.sha256()
    for path in paths:
        files = sorted(f for f in path.rglob(pattern) if f.is_file()) if path.is_dir() else [path]
        for f in files:
            digest.update(f.relative_to(path.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


@dataclass
class Entry:
    kind: str
    key: str
    path: Path
    info: dict[str, Any]

    @property
    def built(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(self.info.get("created", 0)))

    @property
    def last_used(self) -> float:
        used = self.path / USED_FILE
        return used.stat().st_mtime if used.exists() else self.info.get("created", 0)

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.info.get("files", {}).values())


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    """Each file of an entry (relative path → size, mtime, sha256 when small enough), entry.json and .used apart."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = f.relative_to(folder).as_posix()
        if rel in (ENTRY_FILE, USED_FILE):
            continue
        st = f.stat()
        out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    **({"sha256": file_sha256(f)} if st.st_size <= HASHED_BYTES else {})}
    return out


def damage(path: Path) -> str | None:
    """Why the entry at `path` cannot be used (a file missing, resized, rewritten or changed), None if whole."""
    try:
        info = json.loads((path / ENTRY_FILE).read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{ENTRY_FILE} missing or unreadable"
    for rel, want in files.items():
        f = path / rel
        try:
            st = f.stat()
        except OSError:
            return f"{rel} missing"
        if st.st_size != want["size"]:
            return f"{rel} is {st.st_size} bytes, was {want['size']}"
        if "sha256" in want and file_sha256(f) != want["sha256"]:
            return f"{rel} changed (sha256)"
        if "sha256" not in want and st.st_mtime_ns != want["mtime_ns"]:
            return f"{rel} was rewritten"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load(kind: str, path: Path) -> Entry:
    return Entry(kind, path.name, path, json.loads((path / ENTRY_FILE).read_text()))


@contextlib.contextmanager
def _locked(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (the kernel drops it if this process dies)."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(folder: Path, key: str) -> None:
    """Temporary folders of builds of `key` that died (we hold the key's lock, so none is running)."""
    for tmp in folder.glob(f".{key}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def get_or_build(kind: str, parts: dict[str, Any], build: Callable[[Path], None], describe: str,
                 log: Callable[[str], None] = print, announce_reuse: bool = True) -> Entry:
    """The entry of `kind` for `parts`: from the cache when it is there and whole, else `build(folder)` fills a
    temporary folder that becomes the entry. Prints one line either way (`describe` says what it is for; a reuse
    silently where `announce_reuse` is False: a helper library loaded on every start)."""
    if not announce_reuse:
        loud = log
        log = lambda m: None if ": cached, built " in m else loud(m)  # noqa: E731
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}")
    key = key_of(parts)
    folder = cache_root() / kind
    path = folder / key
    if path.is_dir() and damage(path) is None:
        return _reuse(kind, path, describe, log)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GptbcError(f"cache {folder}: cannot create it ({err.strerror}); set GPTBC_CACHE_DIR to a writable "
                         f"folder") from None
    what = KINDS[kind]
    waited = lambda: log(f"[gptbc] {what}: waiting for another process building it ({describe})")  # noqa: E731
    with _locked(folder / f".{key}.lock", waited):
        if path.is_dir():
            why = damage(path)
            if why is None:
                return _reuse(kind, path, describe, log)
            log(f"[gptbc] {what}: cached entry {path} is damaged ({why}); building it again")
            shutil.rmtree(path, ignore_errors=True)
        _remove_leftovers(folder, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=folder))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
        start = time.time()
        try:
            build(tmp)
            raise_if_interrupted()
            info = {"kind": kind, "key": key, "describe": describe, "parts": parts, "created": time.time(),
                    "build_seconds": round(time.time() - start, 2), "files": _records(tmp)}
            (tmp / ENTRY_FILE).write_text(json.dumps(info, indent=1, default=str) + "\n")
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    entry = _load(kind, path)
    log(f"[gptbc] {KINDS[kind]}: built in {entry.info['build_seconds']:.0f}s and cached for {describe} ({path})")
    return entry


def _reuse(kind: str, path: Path, describe: str, log: Callable[[str], None]) -> Entry:
    entry = _load(kind, path)
    with contextlib.suppress(OSError):
        (path / USED_FILE).touch()
    log(f"[gptbc] {KINDS[kind]}: cached, built {entry.built} for {describe}")
    return entry


def entries() -> list[Entry]:
    """Every complete entry in the cache (damaged ones too: `damage` says which)."""
    root, found = cache_root(), []
    for kind in KINDS:
        for path in sorted((root / kind).glob("*")) if (root / kind).is_dir() else []:
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                found.append(_load(kind, path))
            except (OSError, ValueError):
                found.append(Entry(kind, path.name, path, {}))
    return found


def remove(entry: Entry) -> bool:
    """Remove one entry unless a process is building or rebuilding it right now (its lock is held)."""
    lock = entry.path.parent / f".{entry.key}.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            _remove_leftovers(entry.path.parent, entry.key)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    lock.unlink(missing_ok=True)
    return True


def remove_stale_builds() -> int:
    """Temporary folders of dead builds (their key's lock is free); returns how many were removed."""
    root, n = cache_root(), 0
    for kind in KINDS:
        for tmp in (root / kind).glob(".*.tmp-*") if (root / kind).is_dir() else []:
            key = tmp.name[1:].split(".tmp-")[0]
            with open(tmp.parent / f".{key}.lock", "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    n += 1
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
    return n


def prune(older_than_days: float | None = None, max_bytes: int | None = None) -> list[Entry]:
    """Remove damaged entries, entries unused for `older_than_days`, then the least recently used until the
    cache holds at most `max_bytes`; returns what was removed."""
    now, removed = time.time(), []
    alive = []
    for e in entries():
        stale = older_than_days is not None and now - e.last_used > older_than_days * 86400
        if (stale or not e.info or damage(e.path) is not None) and remove(e):
            removed.append(e)
        else:
            alive.append(e)
    if max_bytes is not None:
        total = sum(e.size for e in alive)
        for e in sorted(alive, key=lambda e: e.last_used):
            if total <= max_bytes:
                break
            if remove(e):
                removed.append(e)
                total -= e.size
    remove_stale_builds()
    return removed
