"""
Files identified by their content: a SHA-256 digest of the bytes, remembered per (path, size, mtime, ctime,
inode) so that a large batch is hashed once, not on every run.

A file rewritten in place, or replaced by another of the same size, gets a new ctime (which no user call can set
back), so it is hashed again; the digest then tells whether its content really changed. Caches keyed on the
digest therefore never serve results computed from other bytes, whatever the modification time says.
"""

import hashlib
import json
import os

from guided_diffusion.atomic_io import write_text_atomic

DIGEST_CHARS = 64
_memo = {}  # in-process: stat key -> digest


def _stat_key(path):
    st = os.stat(path)
    return json.dumps(
        [os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    )


def sha256_of_file(path, chunk_bytes=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path, memo_dir=None):
    """
    SHA-256 (hex) of the file at `path`. With memo_dir, the digest is also remembered on disk there (one small
    file per stat key), so other processes reuse it; a memo that cannot be written is skipped silently.
    """
    key = _stat_key(path)
    if key in _memo:
        return _memo[key]
    memo_path = None
    if memo_dir is not None:
        name = hashlib.sha256(key.encode()).hexdigest()[:32]
        memo_path = os.path.join(memo_dir, f"{name}.sha256")
        try:
            with open(memo_path) as f:
                stored = f.read().strip()
            if len(stored) == DIGEST_CHARS and all(c in "0123456789abcdef" for c in stored):
                _memo[key] = stored
                return stored
        except OSError:
            pass
    value = sha256_of_file(path)
    # The file may have changed while it was read: remember the digest only under the stat it had before.
    if _stat_key(path) == key:
        _memo[key] = value
        if memo_path is not None:
            try:
                write_text_atomic(memo_path, value + "\n")
            except OSError:
                pass
    return value
