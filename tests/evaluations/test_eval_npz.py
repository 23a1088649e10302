"""
Streaming npz reading/writing and the errors for malformed batches.
"""

import os
import zipfile

import numpy as np
import pytest

from evaluations.evaluator import Evaluator
from evaluations.npz_io import BatchFormatError, NpzImageReader, NpzWriter, read_stats


def _images(n, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streaming_reader_returns_the_array_in_batches(tmp_path, save):
    arr = _images(23)
    path = tmp_path / "batch.npz"
    save(path, arr, labels=np.arange(23))
    with NpzImageReader(path) as reader:
        assert reader.shape == arr.shape and reader.num_batches(5) == 5
        batches = list(reader.iter_batches(5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), arr)


def test_reader_streams_instead_of_loading_the_whole_array(tmp_path):
    # The header promises 100k 64x64 images (1.2 GB) but only 5 are stored: a reader that
    # loads the array whole fails at once, a streaming one serves the first batch.
    path = tmp_path / "huge.npz"
    data = _images(5, 64, 64)
    with zipfile.ZipFile(path, "w") as zf, zf.open("arr_0.npy", "w", force_zip64=True) as f:
        header = {"descr": "|u1", "fortran_order": False, "shape": (100000, 64, 64, 3)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data.tobytes())
    with NpzImageReader(path) as reader:
        np.testing.assert_array_equal(reader.read_batch(5), data)
        with pytest.raises(BatchFormatError, match="truncated: the header promises 100000 images"):
            reader.read_batch(5)


def test_fortran_ordered_arrays_are_read_in_memory(tmp_path):
    arr = np.asfortranarray(_images(7))
    np.savez(tmp_path / "f.npz", arr)
    with NpzImageReader(tmp_path / "f.npz") as reader:
        np.testing.assert_array_equal(np.concatenate(list(reader.iter_batches(3))), arr)


def test_missing_arr_0_is_rejected(tmp_path):
    np.savez(tmp_path / "b.npz", images=_images(4))
    with pytest.raises(BatchFormatError, match=r"b.npz: no 'arr_0' array in the npz \(found: images\)"):
        NpzImageReader(tmp_path / "b.npz")


def test_non_npz_file_is_rejected(tmp_path):
    np.save(tmp_path / "b.npy", _images(4))
    with pytest.raises(BatchFormatError, match="not an npz file"):
        NpzImageReader(tmp_path / "b.npy")
    with pytest.raises(FileNotFoundError, match="no such file"):
        NpzImageReader(tmp_path / "absent.npz")


@pytest.mark.parametrize(
    "arr,message",
    [
        (np.zeros((4, 6, 5, 3), bool), "has dtype bool; the evaluator takes uint8"),
        (np.zeros((4, 6, 5, 3), np.complex64), "has dtype complex64; the evaluator takes uint8"),
        (np.zeros((4, 6, 5), np.uint8), r"has shape \(4, 6, 5\); expected NHWC images"),
        (np.zeros((4, 3, 6, 5), np.uint8), "which looks like NCHW; expected NHWC images"),
        (np.zeros((4, 6, 5, 2), np.uint8), r"expected NHWC images with C in \(3,\)"),
    ],
)
def test_wrong_dtype_or_layout_is_rejected(tmp_path, arr, message):
    np.savez(tmp_path / "b.npz", arr)
    with pytest.raises(BatchFormatError, match=message):
        NpzImageReader(tmp_path / "b.npz")


@pytest.mark.parametrize(
    "convert",
    [
        lambda x: x.astype(np.float32) / 255,  # [0, 1]: read as levels, near-black images
        lambda x: x.astype(np.float32) / 127.5 - 1,  # [-1, 1]
        lambda x: x.astype(np.float64),  # [0, 255] but float: ambiguous all the same
        lambda x: x.astype(np.uint16),
        lambda x: x.astype(np.int64),
    ],
)
def test_only_uint8_images_are_accepted(tmp_path, convert):
    arr = convert(_images(6))
    np.savez(tmp_path / "b.npz", arr)
    hint = "(x * 255).round().clip(0, 255).astype(np.uint8)"
    with pytest.raises(BatchFormatError) as info:
        NpzImageReader(tmp_path / "b.npz")
    message = str(info.value)
    assert f"'arr_0' has dtype {arr.dtype}; the evaluator takes uint8 NHWC images" in message
    assert hint in message and "\n" not in message
    evaluator = Evaluator(feature_net=lambda x: x.mean(dim=(1, 2)), batch_size=2, progress=False)
    with pytest.raises(BatchFormatError, match="the evaluator takes uint8"):
        evaluator.read_activations(tmp_path / "b.npz")
    assert evaluator.embedded_batches == 0


def test_too_few_images_for_the_metrics_are_rejected(tmp_path):
    np.savez(tmp_path / "b.npz", _images(3))
    evaluator = Evaluator(feature_net=lambda x: x, progress=False)
    with pytest.raises(BatchFormatError, match="holds 3 images; the evaluator needs at least 4"):
        evaluator.open_batch(tmp_path / "b.npz")


def test_writer_streams_chunks_and_writes_atomically(tmp_path):
    arr = _images(10)
    path = tmp_path / "out.npz"
    with NpzWriter(path) as writer:
        with writer.stream_array("arr_0", arr.shape, np.uint8) as stream:
            for chunk in np.array_split(arr, 3):
                stream.write(chunk)
        writer.write_array("mu", np.arange(3.0))
        writer.write_array("name", np.array("net"))
        assert not path.exists()
    with np.load(path) as obj:
        np.testing.assert_array_equal(obj["arr_0"], arr)
        np.testing.assert_array_equal(obj["mu"], np.arange(3.0))
        assert obj["name"].shape == () and str(obj["name"]) == "net"
    assert read_stats(path).keys() == {"mu", "has_images"} and read_stats(path)["has_images"]

    with pytest.raises(ValueError, match="got 90 of 900 bytes"):
        with NpzWriter(tmp_path / "partial.npz") as writer:
            with writer.stream_array("arr_0", arr.shape, np.uint8) as stream:
                stream.write(arr[:1])
    assert os.listdir(tmp_path) == ["out.npz"]
