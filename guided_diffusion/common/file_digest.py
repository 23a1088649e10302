"""
Files identified by content: the SHA-256 of a checkpoint, a reference batch or an input file, so that a file
replaced by another of the same name and size is seen as the other file it is.

Hashing a 2 GB checkpoint takes seconds, so a digest is remembered (in this process and in small files under
$PAG_ADM_DIGEST_DIR, default ~/.cache/pag_adm/digests) per file identity: absolute path, size, modification time,
inode change time, inode and device. The change time is in the key because a modification time can be set back
(`cp -p`, `touch -r`, `os.utime`) or be too coarse to tell two writes apart, while the change time moves on every
write, rename onto the path or utime call and cannot be set by a user; an unchanged identity therefore means an
unchanged file. The cache is an optimisation only: when its folder cannot be written, digests are just
recomputed.
"""

import hashlib
import json
import os

from .atomic_io import write_json_atomic

DIGEST_DIR_ENV = "PAG_ADM_DIGEST_DIR"
_CHUNK = 1 << 22

_memo = {}


def digest_cache_dir():
    return os.environ.get(DIGEST_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pag_adm", "digests")


def _identity(path):
    st = os.stat(path)
    return {
        "path": os.path.abspath(path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def _cache_file(identity):
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(digest_cache_dir(), f"{key}.json")


def _read_cached(identity):
    try:
        with open(_cache_file(identity)) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if entry.get("identity") != identity or not isinstance(entry.get("sha256"), str):
        return None
    return entry["sha256"]


def _write_cached(identity, digest):
    try:
        write_json_atomic(_cache_file(identity), {"identity": identity, "sha256": digest})
    except OSError:
        pass


def sha256_of(path):
    """
    The SHA-256 (hex) of a file's bytes, read in chunks.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def file_digest(path):
    """
    The SHA-256 (hex) of a file, computed once per file identity (see the module docstring).
    """
    identity = _identity(path)
    memo_key = json.dumps(identity, sort_keys=True)
    digest = _memo.get(memo_key) or _read_cached(identity)
    if digest is None:
        digest = sha256_of(path)
        # A file written while it was read is not the file the identity names: leave it uncached.
        if _identity(path) == identity:
            _write_cached(identity, digest)
    _memo[memo_key] = digest
    return digest


def tree_digest(folder):
    """
    The SHA-256 (hex) of a folder's files: their relative paths, sizes and digests, in sorted order. Hidden files
    and folders (a leading '.') are left out.
    """
    h = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            h.update(json.dumps([rel, os.path.getsize(path), file_digest(path)]).encode())
            count += 1
    return h.hexdigest(), count


def file_record(path):
    """
    A file or folder named by absolute path and content, for run records and cache keys: {"path", "bytes",
    "sha256"} for a file, {"path", "files", "sha256"} for a folder, None for an empty path.
    """
    if not path:
        return None
    if os.path.isdir(path):
        digest, count = tree_digest(path)
        return {"path": os.path.abspath(path), "files": count, "sha256": digest}
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": file_digest(path)}
