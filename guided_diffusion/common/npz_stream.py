"""
Npz files written and joined a chunk at a time, so that a 50k x 256 x 256 x 3 batch (9.8 GB) never has to be in
memory: the sampler's final join of its parts, merge_shards and the evaluator's batches stream through here.

What join_npz writes is byte for byte what np.savez writes for the concatenated arrays (same members in the same
order, same npy headers, an uncompressed zip64 member each), so a streamed file is indistinguishable from one
saved whole.
"""

import os
import zipfile

import numpy as np

from .atomic_io import temporary_path

# Raw bytes copied per read when an array is streamed from one npz member into another.
COPY_CHUNK_BYTES = 4 * 2**20


class NpzReadError(ValueError):
    """
    An npz file that cannot be read back whole (truncated, empty, a flipped bit caught by the zip's CRC-32, a
    broken npy header); .path names the file, the message says what is wrong.
    """

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NpzWriter:
    """
    Writes an npz one array at a time; an array can be streamed in chunks of its first axis.
    The file appears at `path` only when close() succeeds (temporary file, fsync, os.replace).
    """

    def __init__(self, path):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._tmp_path = temporary_path(self.path)
        self._file = open(self._tmp_path, "wb")
        try:
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:
            self._file.close()
            self._remove_tmp()
            raise

    def write_array(self, name, array):
        array = np.asarray(array)  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
        with self.stream_array(name, array.shape, array.dtype) as stream:
            stream.write_bytes(array.tobytes(order="C"))

    def stream_array(self, name, shape, dtype):
        return _ArrayStream(self._zip, name, tuple(shape), np.dtype(dtype))

    def close(self):
        try:
            self._zip.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path, self.path)
        except BaseException:
            # A target that cannot be replaced (a folder, a read-only place) leaves no temporary file behind.
            self._file.close()
            self._remove_tmp()
            raise

    def _remove_tmp(self):
        try:
            os.remove(self._tmp_path)
        except FileNotFoundError:
            pass

    def abort(self):
        try:
            try:
                self._zip.close()
            except OSError:
                pass  # a full disk fails the zip's last write too; the file goes anyway
            self._file.close()
        finally:
            self._remove_tmp()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _write_header(member, shape, dtype):
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    # As np.save: format 1.0 unless the header does not fit its 2-byte length.
    try:
        np.lib.format.write_array_header_1_0(member, header)
    except ValueError:
        np.lib.format.write_array_header_2_0(member, header)


class _ArrayStream:
    def __init__(self, zip_file, name, shape, dtype):
        self.shape = shape
        self.dtype = dtype
        self._expected = int(np.prod(shape)) * dtype.itemsize
        self._written = 0
        self._name = name
        self._member = zip_file.open(f"{name}.npy", "w", force_zip64=True)
        _write_header(self._member, shape, dtype)

    def write(self, chunk):
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.shape[1:]:
            raise ValueError(
                f"chunk of shape {chunk.shape} does not fit array '{self._name}' of shape {self.shape}"
            )
        self.write_bytes(chunk.tobytes())

    def write_bytes(self, data):
        if self._written + len(data) > self._expected:
            raise ValueError(f"too much data for array '{self._name}' of shape {self.shape}")
        self._member.write(data)
        self._written += len(data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._member.close()
        if exc_type is None and self._written != self._expected:
            raise ValueError(
                f"array '{self._name}' of shape {self.shape} got {self._written} of "
                f"{self._expected} bytes"
            )


# --- reading members without loading them ---------------------------------------------------------------------


def _read_header(member):
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"npy format {version[0]}.{version[1]} is not streamed")


def _open_zip(path):
    try:
        return zipfile.ZipFile(path, "r")
    except FileNotFoundError:
        raise NpzReadError(path, "no such file") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise NpzReadError(path, f"not a readable npz file ({exc or type(exc).__name__})") from None


def _damaged(path, name, exc):
    return NpzReadError(path, f"'{name}' is damaged ({exc or type(exc).__name__})")


def npz_layout(path):
    """
    [(key, shape, dtype)] of the arrays of an npz, in file order, read from their npy headers only.

    :raises NpzReadError: a file that is no npz, or a member that is no plain (C-ordered, non-object) npy array.
    """
    with _open_zip(path) as zf:
        layout = []
        for name in zf.namelist():
            try:
                with zf.open(name) as member:
                    shape, fortran, dtype = _read_header(member)
            except Exception as exc:  # noqa: BLE001 (zipfile and numpy raise many kinds for damaged bytes)
                raise _damaged(path, name, exc) from None
            if fortran or dtype.hasobject or not name.endswith(".npy"):
                raise NpzReadError(path, f"'{name}' is not a plain C-ordered npy array")
            layout.append((name[: -len(".npy")], tuple(shape), np.dtype(dtype)))
    return layout


def verify_npz(path):
    """
    Read every byte of an npz (in chunks), so that the zip's CRC-32 of each member is checked: a truncated file or
    a flipped bit anywhere is found. :return: npz_layout(path). :raises NpzReadError: what is wrong.
    """
    layout = npz_layout(path)
    with _open_zip(path) as zf:
        for name in zf.namelist():
            try:
                with zf.open(name) as member:
                    while member.read(COPY_CHUNK_BYTES):
                        pass
            except Exception as exc:  # noqa: BLE001
                raise _damaged(path, name, exc) from None
    return layout


def _copy_member(path, zf, key, shape, dtype, stream):
    """
    Copy the data of member `key` (header checked against shape and dtype) into `stream`, a chunk at a time; the
    last read checks the member's CRC-32. A failed read is the source's NpzReadError, a failed write the writer's
    own OSError (a full disk is not a damaged part).
    """
    left = int(np.prod(shape)) * dtype.itemsize

    def read(member, count):
        try:
            return member.read(count)
        except Exception as exc:  # noqa: BLE001 (zipfile raises many kinds for damaged bytes)
            raise _damaged(path, f"{key}.npy", exc) from None

    try:
        member = zf.open(f"{key}.npy")
        found_shape, fortran, found_dtype = _read_header(member)
    except Exception as exc:  # noqa: BLE001
        raise _damaged(path, f"{key}.npy", exc) from None
    with member:
        if tuple(found_shape) != tuple(shape) or np.dtype(found_dtype) != dtype or fortran:
            raise _damaged(path, f"{key}.npy", f"its header changed while it was read ({found_shape}, {found_dtype})")
        while left > 0:
            data = read(member, min(COPY_CHUNK_BYTES, left))
            if not data:
                raise _damaged(path, f"{key}.npy", f"the data ends {left} bytes early")
            stream.write_bytes(data)
            left -= len(data)
        if read(member, 1):
            raise _damaged(path, f"{key}.npy", "it holds more data than its header says")


def join_npz(out_path, sources, keys, extra=None):
    """
    Write out_path (atomically): for each key in order, the concatenation along the first axis of that array in
    the source files, in their order, then the `extra` named arrays; byte for byte what
    np.savez(out_path, **{k: np.concatenate(...)}, **extra) writes, in memory of a chunk, not of the result.

    :param sources: [(path, layout)] with layout as npz_layout(path) returned it (the caller has checked the
                    arrays fit together: same trailing shape and dtype per key).
    :raises NpzReadError: a source that turns out damaged while it is copied (nothing is written then).
    """
    with NpzWriter(out_path) as writer:
        for key in keys:
            entries = [dict((k, (s, d)) for k, s, d in layout)[key] for _, layout in sources]
            trailing, dtype = entries[0][0][1:], entries[0][1]
            total = sum(shape[0] for shape, _ in entries)
            with writer.stream_array(key, (total, *trailing), dtype) as stream:
                # One source open at a time: a run's thousands of parts would exceed the open-file limit.
                for (path, _), (shape, _) in zip(sources, entries):
                    with _open_zip(path) as zf:
                        _copy_member(path, zf, key, shape, dtype, stream)
        for name, array in (extra or {}).items():
            writer.write_array(name, array)
    return out_path


def npz_heads(path, rows):
    """
    The first `rows` rows of each array of an npz, in file order (what a grid of the first samples needs), read
    without loading the rest.
    """
    heads = []
    with _open_zip(path) as zf:
        for key, shape, dtype in npz_layout(path):
            with zf.open(f"{key}.npy") as member:
                _read_header(member)
                count = min(rows, shape[0]) if shape else 1
                row_items = int(np.prod(shape[1:])) if shape else 1
                data = member.read(count * row_items * dtype.itemsize)
            heads.append(np.frombuffer(data, dtype=dtype).reshape((count, *shape[1:]) if shape else ()).copy())
    return heads
