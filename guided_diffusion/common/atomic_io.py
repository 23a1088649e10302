"""
Writing files so that a reader (or a resumed run) sees either the old file or the whole new one, never a part:
everything is written to a temporary file beside the target and renamed over it.
"""

import contextlib
import json
import os
import tempfile

import blobfile as bf
import numpy as np
import torch as th

# Temporary files start with this prefix, so a folder's leftovers from a killed writer can be recognised.
TMP_PREFIX = ".tmp-"


def temporary_path(path):
    """
    The temporary file that stands in for `path` while it is written (same folder, so the rename is atomic).
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{name}")


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """
    A file object for writing `path`: on a clean exit it is synced and renamed over `path`; on an exception the
    temporary file is removed and `path` is left as it was. The parent folder is created if missing.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, write):
    """
    Call write(file) on a binary file that becomes `path` only once write returns.
    """
    with atomic_open(path) as f:
        write(f)


def write_text_atomic(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npz_atomic(path, arrays, compressed=False):
    """
    np.savez to `path` atomically. `arrays` is a list (saved as arr_0, arr_1, ... as ADM's scripts save them) or
    a dict of named arrays.
    """
    save = np.savez_compressed if compressed else np.savez
    if isinstance(arrays, dict):
        atomic_write(path, lambda f: save(f, **arrays))
    else:
        atomic_write(path, lambda f: save(f, *arrays))


def torch_save_atomic(obj, path):
    """
    torch.save to `path` atomically; object-store URLs (blobfile) publish a blob only once its upload completes,
    so they are written directly.
    """
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            th.save(obj, f)
        return
    atomic_write(path, lambda f: th.save(obj, f))


def remove_temporary_files(folder):
    """
    Delete the temporary files a killed writer left in `folder`.
    """
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(folder, name))


def nearest_existing(path):
    """
    `path` itself if it exists, else its nearest existing ancestor folder (or file).
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def probe_write(folder):
    """
    None when a file can be created (and is at once removed) in the existing `folder`, else the OSError that
    creating it raised. A real write, since permission bits do not show read-only mounts, /proc, quotas taken to
    zero or ACLs (and os.access says yes to root).
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    os.remove(name)
    return None


def unwritable_reason(path, is_folder=True):
    """
    Why `path` (a folder to create or write into, or with is_folder=False a file to write) cannot be written, or
    None when it can. Nothing is created: the nearest existing folder on the way is tried with a probe file
    (probe_write).
    """
    target = os.path.abspath(path)
    if is_folder and os.path.exists(target) and not os.path.isdir(target):
        return f"{path!r} is an existing file, not a folder"
    if not is_folder and os.path.isdir(target):
        return f"{path!r} is a folder, not a file"
    probe = nearest_existing(target if is_folder else os.path.dirname(target))
    if not os.path.isdir(probe):
        return f"{path!r} lies under the file {probe!r}, not in a folder"
    exc = probe_write(probe)
    if exc is not None:
        return f"{path!r} cannot be written: cannot create files in {probe!r} ({exc.strerror or exc})"
    return None
