"""
Streaming reads and writes of image batches in ADM's npz layout.

ADM's reference and sample batches keep NHWC images under `arr_0` (uint8 in [0, 255]); reference
batches may also hold FID statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s`
(spatial features). A 50k x 256 x 256 x 3 batch is about 9.8 GB, so images are read a batch at a
time straight out of the zip member instead of through np.load, and written the same way.
"""

import os
import zipfile

import numpy as np

from guided_diffusion.common.assets import fetch_hint
from guided_diffusion.common.atomic_io import temporary_path

IMAGE_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# The feature network the statistics were computed with: its name and a digest of its weights
# (feature_nets.net_identity), written by make_reference_batch.py.
STATS_IDENTITY_KEYS = ("stats_feature_net", "stats_feature_weights")


class BatchFormatError(ValueError):
    """An npz batch that is not laid out the way the evaluator needs it."""


# How to turn the usual float sample layouts into what ADM's sample scripts save.
UINT8_HINT = (
    "convert floats in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8), floats in "
    "[-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
)


def check_image_layout(shape, dtype, path, key=IMAGE_KEY, channels=(3,)):
    """
    Check the header of an image array (before any data is read).

    Only uint8 is accepted, as ADM's sample scripts save it: a float array is ambiguous ([0, 1],
    [-1, 1] or [0, 255]), and guessing wrong gives a plausible-looking but meaningless FID.

    :param channels: the channel counts the feature network accepts, or None for any.
    """
    dtype = np.dtype(dtype)
    if dtype != np.uint8:
        raise BatchFormatError(
            f"{path}: '{key}' has dtype {dtype}; the evaluator takes uint8 NHWC images with "
            f"values 0..255 as ADM saves them: {UINT8_HINT}"
        )
    if len(shape) != 4:
        raise BatchFormatError(
            f"{path}: '{key}' has shape {tuple(shape)}; expected NHWC images (N x H x W x C)"
        )
    if channels is not None and shape[3] not in channels:
        if shape[1] in channels:
            raise BatchFormatError(
                f"{path}: '{key}' has shape {tuple(shape)}, which looks like NCHW; "
                f"expected NHWC images (channels last, C in {tuple(channels)})"
            )
        raise BatchFormatError(
            f"{path}: '{key}' has shape {tuple(shape)}; expected NHWC images with "
            f"C in {tuple(channels)}"
        )
    if shape[1] < 1 or shape[2] < 1:
        raise BatchFormatError(f"{path}: '{key}' has empty images of shape {tuple(shape[1:])}")


class NpzImageReader:
    """
    Reads one array of an npz file in batches along its first axis, without loading it whole.

    Use as a context manager. Fortran-ordered arrays and npy format 3.0 members cannot be
    streamed and are loaded into memory instead, as ADM's reader does.
    """

    def __init__(self, path, key=IMAGE_KEY, channels=(3,)):
        self.path = str(path)
        self.key = key
        self._file = None
        self._zip = None
        self._member = None
        self._array = None
        self.index = 0
        try:
            self._open(channels)
        except BaseException:
            self.close()
            raise

    def _open(self, channels):
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file{fetch_hint(self.path)}")
        self._file = open(self.path, "rb")
        try:
            self._zip = zipfile.ZipFile(self._file, "r")
        except zipfile.BadZipFile:
            raise BatchFormatError(
                f"{self.path}: not an npz file (expected a zip archive as written by np.savez)"
            ) from None
        names = self._zip.namelist()
        if f"{self.key}.npy" not in names:
            found = ", ".join(sorted(n[:-4] for n in names if n.endswith(".npy"))) or "nothing"
            raise BatchFormatError(f"{self.path}: no '{self.key}' array in the npz (found: {found})")
        self._member = self._zip.open(f"{self.key}.npy", "r")
        try:
            version = np.lib.format.read_magic(self._member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._member)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._member)
            else:
                shape, fortran, dtype = None, True, None
        except ValueError as exc:
            raise BatchFormatError(f"{self.path}: '{self.key}' is not a valid npy array ({exc})")
        if fortran or dtype is None or dtype.hasobject:
            self._member.close()
            self._member = None
            with np.load(self.path, allow_pickle=False) as obj:
                self._array = np.ascontiguousarray(obj[self.key])
            shape, dtype = self._array.shape, self._array.dtype
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        check_image_layout(self.shape, self.dtype, self.path, self.key, channels)

    @property
    def num_images(self):
        return self.shape[0]

    def remaining(self):
        return max(0, self.num_images - self.index)

    def read_batch(self, batch_size):
        """Return the next (at most) batch_size images, or None at the end."""
        if self.index >= self.num_images:
            return None
        count = min(batch_size, self.num_images - self.index)
        start = self.index
        if self._array is not None:
            batch = self._array[start : start + count]
        else:
            image_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
            data = _read_exactly(self._member, count * image_bytes)
            if len(data) != count * image_bytes:
                raise BatchFormatError(
                    f"{self.path}: '{self.key}' is truncated: the header promises "
                    f"{self.num_images} images, the data ends after "
                    f"{start + len(data) // max(1, image_bytes)}"
                )
            batch = np.frombuffer(data, dtype=self.dtype).reshape((count,) + self.shape[1:])
        self.index += count
        return batch

    def iter_batches(self, batch_size):
        while True:
            batch = self.read_batch(batch_size)
            if batch is None:
                return
            yield batch

    def num_batches(self, batch_size):
        return -(-self.remaining() // batch_size)

    def close(self):
        for handle in (self._member, self._zip, self._file):
            if handle is not None:
                handle.close()
        self._member = self._zip = self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_exactly(stream, nbytes):
    # Zip members may return short reads; loop until the request is met or the data ends.
    chunks = []
    remaining = nbytes
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_image_header(path, key=IMAGE_KEY, channels=(3,)):
    """Return (shape, dtype) of the image array after checking its layout."""
    with NpzImageReader(path, key, channels) as reader:
        return reader.shape, reader.dtype


def read_stats(path):
    """
    Return the precomputed FID statistics of a reference batch as a dict with the keys of
    STATS_KEYS and STATS_IDENTITY_KEYS present in the file (possibly empty), and whether it
    holds images (`has_images`). Only those members are read.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file{fetch_hint(path)}")
    if not zipfile.is_zipfile(path):
        raise BatchFormatError(
            f"{path}: not an npz file (expected a zip archive as written by np.savez)"
        )
    with np.load(path, allow_pickle=False) as obj:
        stats = {k: np.asarray(obj[k]) for k in STATS_KEYS if k in obj.files}
        for key in STATS_IDENTITY_KEYS:
            if key in obj.files:
                stats[key] = str(obj[key])
        stats["has_images"] = IMAGE_KEY in obj.files
    return stats


class NpzWriter:
    """
    Writes an npz one array at a time; an array can be streamed in chunks of its first axis.
    The file appears at `path` only when close() succeeds (temporary file + os.replace).
    """

    def __init__(self, path):
        self.path = str(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        self._tmp_path = temporary_path(self.path)
        self._zip = zipfile.ZipFile(self._tmp_path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def write_array(self, name, array):
        array = np.asarray(array)  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
        with self.stream_array(name, array.shape, array.dtype) as stream:
            stream.write_bytes(array.tobytes(order="C"))

    def stream_array(self, name, shape, dtype):
        return _ArrayStream(self._zip, name, tuple(shape), np.dtype(dtype))

    def close(self):
        try:
            self._zip.close()
            os.replace(self._tmp_path, self.path)
        except BaseException:
            # A target that cannot be replaced (a folder, a read-only place) leaves no temporary file behind.
            self._remove_tmp()
            raise

    def _remove_tmp(self):
        try:
            os.remove(self._tmp_path)
        except FileNotFoundError:
            pass

    def abort(self):
        try:
            self._zip.close()
        finally:
            self._remove_tmp()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _ArrayStream:
    def __init__(self, zip_file, name, shape, dtype):
        self.shape = shape
        self.dtype = dtype
        self._expected = int(np.prod(shape)) * dtype.itemsize
        self._written = 0
        self._name = name
        self._member = zip_file.open(f"{name}.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_1_0(self._member, header)

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
