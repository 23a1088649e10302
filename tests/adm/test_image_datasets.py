import os
import random
import sys

import numpy as np
import pytest

from guided_diffusion import image_datasets
from guided_diffusion.image_datasets import (
    ImageDataset,
    _list_image_files_recursively,
    center_crop_arr,
    load_data,
    random_crop_arr,
)

try:
    from PIL import Image
except ImportError:  # Pillow is optional; only the missing-Pillow test runs without it
    Image = None

requires_pil = pytest.mark.skipif(Image is None, reason="Pillow not installed")


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@pytest.fixture
def image_dir(tmp_path):
    """Six images of three classes (one in a subfolder, one JPEG) plus a non-image file."""
    root = tmp_path / "data"
    colors = {
        "cat_0.png": (255, 0, 0),
        "dog_1.png": (0, 255, 0),
        "cat_2.png": (0, 0, 255),
        "ant_3.png": (255, 255, 255),
        "sub/dog_4.png": (0, 0, 0),
        "sub/cat_5.jpg": (128, 128, 128),
    }
    for name, rgb in colors.items():
        _save(str(root / name), _solid(12, 20, rgb))
    (root / "notes.txt").write_text("not an image")
    return str(root)


@requires_pil
def test_lists_images_sorted_and_recursively(image_dir):
    files = _list_image_files_recursively(image_dir)
    rel = [os.path.relpath(f, image_dir) for f in files]
    assert rel == ["ant_3.png", "cat_0.png", "cat_2.png", "dog_1.png", "sub/cat_5.jpg", "sub/dog_4.png"]


@requires_pil
def test_center_crop_arr_matches_adm_recipe():
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, size=(40, 70, 3)).astype(np.uint8)
    pil = Image.fromarray(arr)
    out = center_crop_arr(pil, 8)

    # The recipe spelled out: halve with BOX while the short side is >= 16, bicubic to short side 8, centre crop.
    ref = pil.resize((35, 20), resample=Image.BOX).resize((17, 10), resample=Image.BOX)
    ref = np.array(ref.resize((14, 8), resample=Image.BICUBIC))  # 17 * 0.8 = 13.6 -> 14
    ref = ref[0:8, 3:11]
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)


@requires_pil
def test_center_crop_arr_takes_the_middle():
    # Left third red, middle green, right third blue: a centred square crop sees only green.
    arr = np.zeros((16, 48, 3), dtype=np.uint8)
    arr[:, :16, 0] = 255
    arr[:, 16:32, 1] = 255
    arr[:, 32:, 2] = 255
    out = center_crop_arr(Image.fromarray(arr), 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, _solid(16, 16, (0, 255, 0)))


@requires_pil
def test_random_crop_arr_shape_and_determinism():
    rng = np.random.RandomState(1)
    pil = Image.fromarray(rng.randint(0, 256, size=(50, 60, 3)).astype(np.uint8))
    random.seed(3)
    a = random_crop_arr(pil, 16)
    random.seed(3)
    b = random_crop_arr(pil, 16)
    assert a.shape == (16, 16, 3)
    np.testing.assert_array_equal(a, b)
    # A solid image stays solid whatever the crop.
    solid = random_crop_arr(Image.fromarray(_solid(30, 40, (10, 20, 30))), 16)
    np.testing.assert_array_equal(solid, _solid(16, 16, (10, 20, 30)))


@requires_pil
def test_image_dataset_item_range_and_flip(tmp_path):
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:, :4] = 255  # left half white, right half black
    path = str(tmp_path / "x_0.png")
    _save(path, arr)

    ds = ImageDataset(8, [path], classes=[4], random_flip=False)
    img, out = ds[0]
    assert img.shape == (3, 8, 8) and img.dtype == np.float32
    assert out["y"].dtype == np.int64 and int(out["y"]) == 4
    expected = np.where(np.arange(8) < 4, 1.0, -1.0).astype(np.float32)
    np.testing.assert_array_equal(img, np.broadcast_to(expected, (3, 8, 8)))

    # The image flips left-right when random.random() < 0.5: seed 0 draws 0.84 (kept), seed 1 0.13 (flipped).
    flipping = ImageDataset(8, [path], random_flip=True)
    random.seed(0)
    kept, out = flipping[0]
    assert out == {}
    np.testing.assert_array_equal(kept, img)
    random.seed(1)
    flipped, _ = flipping[0]
    np.testing.assert_array_equal(flipped, img[:, :, ::-1])


@requires_pil
def test_sharding_over_two_ranks(image_dir):
    files = _list_image_files_recursively(image_dir)
    classes = list(range(len(files)))
    shard0 = ImageDataset(4, files, classes=classes, shard=0, num_shards=2)
    shard1 = ImageDataset(4, files, classes=classes, shard=1, num_shards=2)
    assert shard0.local_images == files[0::2] and shard1.local_images == files[1::2]
    assert shard0.local_classes == [0, 2, 4] and shard1.local_classes == [1, 3, 5]
    assert len(shard0) == 3 and len(shard1) == 3
    with pytest.raises(ValueError, match=r"shard must be in \[0, 2\), got 2"):
        ImageDataset(4, files, shard=2, num_shards=2)


@requires_pil
def test_load_data_batches_and_labels(image_dir):
    data = load_data(
        data_dir=image_dir,
        batch_size=3,
        image_size=8,
        class_cond=True,
        deterministic=True,
        random_flip=False,
    )
    seen = []
    for _ in range(4):  # two passes over the six files: the stream never ends
        batch, cond = next(data)
        assert tuple(batch.shape) == (3, 3, 8, 8)
        assert batch.dtype.is_floating_point
        assert float(batch.min()) >= -1.0 and float(batch.max()) <= 1.0
        seen.append(cond["y"].tolist())
    # Classes are numbered by sorted name: ant=0, cat=1, dog=2; files come in sorted-path order.
    assert seen == [[0, 1, 1], [2, 1, 2]] * 2
    first, _ = next(
        load_data(data_dir=image_dir, batch_size=6, image_size=8, deterministic=True, random_flip=False)
    )
    # ant_3 is white, cat_0 red: check the exact scaling to [-1, 1].
    np.testing.assert_allclose(first[0].numpy(), np.ones((3, 8, 8)), atol=1e-6)
    np.testing.assert_allclose(first[1, 0].numpy(), np.ones((8, 8)), atol=1e-6)
    np.testing.assert_allclose(first[1, 1:].numpy(), -np.ones((2, 8, 8)), atol=1e-6)


@requires_pil
def test_load_data_without_class_cond_has_empty_kwargs(image_dir):
    batch, cond = next(load_data(data_dir=image_dir, batch_size=2, image_size=4))
    assert tuple(batch.shape) == (2, 3, 4, 4) and cond == {}


@requires_pil
def test_load_data_errors(tmp_path, image_dir):
    with pytest.raises(ValueError, match="unspecified data directory"):
        next(load_data(data_dir="", batch_size=1, image_size=8))
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"data directory does not exist: {missing}"):
        next(load_data(data_dir=missing, batch_size=1, image_size=8))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no images \\(jpg, jpeg, png, gif\\) found under {empty}"):
        next(load_data(data_dir=str(empty), batch_size=1, image_size=8))
    with pytest.raises(ValueError, match="has 6 images, fewer than batch_size=7"):
        next(load_data(data_dir=image_dir, batch_size=7, image_size=8))


def test_missing_pillow_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow to read images; install it with `pip install pillow`"):
        image_datasets._pil_image()


# --- npz datasets ---------------------------------------------------------------------------------------------


def _write_npz(path, n=6, size=8, channels=3, labels=True):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(n, size, size, channels)).astype(np.uint8)
    arrays = dict(arr_0=images)
    if labels:
        arrays["arr_1"] = np.arange(n) % 3
    np.savez(path, **arrays)
    return images


def test_npz_dataset_values_labels_and_shards(tmp_path):
    from guided_diffusion.image_datasets import NpzImageDataset

    path = str(tmp_path / "d.npz")
    images = _write_npz(path)
    ds = NpzImageDataset(8, path, class_cond=True, shard=1, num_shards=2, random_flip=False)
    assert len(ds) == 3
    arr, kw = ds[1]
    expected = images[3].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(arr, expected.transpose(2, 0, 1))
    assert int(kw["y"]) == 0  # image 3 has label 3 % 3


def test_npz_dataset_grey_images_become_rgb(tmp_path):
    from guided_diffusion.image_datasets import NpzImageDataset

    path = str(tmp_path / "g.npz")
    _write_npz(path, channels=1, labels=False)
    arr, kw = NpzImageDataset(8, path, random_flip=False)[0]
    assert arr.shape == (3, 8, 8) and kw == {}
    np.testing.assert_array_equal(arr[0], arr[2])


def test_npz_dataset_errors(tmp_path):
    from guided_diffusion.image_datasets import NpzImageDataset

    path = str(tmp_path / "d.npz")
    _write_npz(path, labels=False)
    with pytest.raises(ValueError, match="holds 8x8 images, but image_size is 16"):
        NpzImageDataset(16, path)
    with pytest.raises(ValueError, match="class_cond needs labels in arr_1"):
        NpzImageDataset(8, path, class_cond=True)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="must be NHWC uint8"):
        NpzImageDataset(8, bad)
    with pytest.raises(FileNotFoundError, match="dataset file does not exist"):
        next(load_data(data_dir=str(tmp_path / "missing.npz"), batch_size=1, image_size=8))


def test_load_data_reads_npz_batches(tmp_path):
    path = str(tmp_path / "d.npz")
    _write_npz(path)
    batch, kw = next(load_data(data_dir=path, batch_size=4, image_size=8, class_cond=True))
    assert tuple(batch.shape) == (4, 3, 8, 8) and tuple(kw["y"].shape) == (4,)
