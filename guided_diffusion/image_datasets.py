"""
Image folders as an endless stream of training batches, as ADM reads them.
"""

import math
import random

import blobfile as bf
import numpy as np
from torch.utils.data import DataLoader, Dataset

from .common import launch_env

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")


def _pil_image():
    # Pillow is only needed for training from image folders, so it is not a hard dependency.
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "guided_diffusion.image_datasets needs Pillow to read images; install it with `pip install pillow`"
        ) from exc
    return Image


def _resample(name):
    Image = _pil_image()
    # Pillow >= 9.1 moved the filters into Image.Resampling.
    return getattr(getattr(Image, "Resampling", Image), name)


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
):
    """
    Yield (images, kwargs) batches forever from the images under data_dir.

    images is an NCHW float tensor in [-1, 1]; kwargs holds "y", the class index, when
    class_cond is set. The class of a file is the part of its name before the first "_",
    and classes are numbered in sorted order of those names. Each rank reads its own
    shard of the files.

    data_dir may also be an .npz file in ADM's sample/reference layout: `arr_0` NHWC uint8
    images of the right size and, for class_cond, `arr_1` integer labels.
    """
    if not data_dir:
        raise ValueError("unspecified data directory")
    shard, num_shards = launch_env.rank(), launch_env.world_size()
    if data_dir.endswith(".npz"):
        if not bf.exists(data_dir):
            raise FileNotFoundError(f"dataset file does not exist: {data_dir}")
        dataset = NpzImageDataset(
            image_size,
            data_dir,
            class_cond=class_cond,
            shard=shard,
            num_shards=num_shards,
            random_flip=random_flip,
        )
    else:
        if not bf.isdir(data_dir):
            raise FileNotFoundError(f"data directory does not exist: {data_dir}")
        all_files = list_image_files(data_dir)
        if not all_files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {data_dir}")
        classes = None
        if class_cond:
            class_names = [bf.basename(path).split("_")[0] for path in all_files]
            sorted_classes = {x: i for i, x in enumerate(sorted(set(class_names)))}
            classes = [sorted_classes[x] for x in class_names]
        dataset = ImageDataset(
            image_size,
            all_files,
            classes=classes,
            shard=shard,
            num_shards=num_shards,
            random_crop=random_crop,
            random_flip=random_flip,
        )
    if len(dataset) < batch_size:
        # With drop_last, a shard smaller than a batch would make the loop below spin forever.
        raise ValueError(
            f"this rank's shard of {data_dir} has {len(dataset)} images, fewer than batch_size={batch_size}"
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not deterministic,
        num_workers=1,
        drop_last=True,
    )
    while True:
        yield from loader


def list_image_files(data_dir):
    """
    Image files under data_dir, recursively, in ADM's order: entries sorted by name at each level, a folder's files
    in its place. Training, the reference-batch maker and inverse_sample.py all list folders with this, so image i
    is the same file for each of them.
    """
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        full_path = bf.join(data_dir, entry)
        ext = entry.split(".")[-1]
        if "." in entry and ext.lower() in IMAGE_EXTENSIONS:
            results.append(full_path)
        elif bf.isdir(full_path):
            results.extend(list_image_files(full_path))
    return results


# ADM's name for it.
_list_image_files_recursively = list_image_files


class ImageDataset(Dataset):
    """
    Every num_shards-th image starting at shard, as CHW float32 arrays in [-1, 1].
    """

    def __init__(
        self,
        resolution,
        image_paths,
        classes=None,
        shard=0,
        num_shards=1,
        random_crop=False,
        random_flip=True,
    ):
        super().__init__()
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError(f"got {len(classes)} classes for {len(image_paths)} images")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        Image = _pil_image()
        path = self.local_images[idx]
        with bf.BlobFile(path, "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
        pil_image = pil_image.convert("RGB")

        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution)
        else:
            arr = center_crop_arr(pil_image, self.resolution)

        return _training_example(arr, self.random_flip, self.local_classes, idx)


class NpzImageDataset(Dataset):
    """
    Every num_shards-th image of an npz holding `arr_0` (NHWC uint8), as CHW float32 in [-1, 1].

    The images must already have the training resolution: an npz has no original to crop from.
    """

    def __init__(self, resolution, path, class_cond=False, shard=0, num_shards=1, random_flip=True):
        super().__init__()
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        with bf.BlobFile(path, "rb") as f, np.load(f) as data:
            if "arr_0" not in data:
                raise ValueError(f"{path} has no arr_0 (expected NHWC uint8 images)")
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(
                f"{path}: arr_0 must be NHWC uint8 with 1 or 3 channels, got {images.dtype} {images.shape}"
            )
        if images.shape[1:3] != (resolution, resolution):
            raise ValueError(
                f"{path} holds {images.shape[1]}x{images.shape[2]} images, but image_size is {resolution}"
            )
        if class_cond and labels is None:
            raise ValueError(f"class_cond needs labels in arr_1, and {path} has none")
        if images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        self.local_images = images[shard::num_shards]
        self.local_classes = None if not class_cond else labels[shard::num_shards].astype(np.int64)
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        return _training_example(self.local_images[idx], self.random_flip, self.local_classes, idx)


def _training_example(arr, random_flip, classes, idx):
    """
    An HWC uint8 image (and its class) -> (CHW float32 in [-1, 1], {"y": class} or {}), flipped half the time.
    """
    if random_flip and random.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr.astype(np.float32) / 127.5 - 1
    out_dict = {}
    if classes is not None:
        out_dict["y"] = np.array(classes[idx], dtype=np.int64)
    return np.transpose(arr, [2, 0, 1]), out_dict


def center_crop_arr(pil_image, image_size):
    """
    Resize so the short side is image_size, then take the central square, as an HWC uint8 array.
    """
    # Halving with a box filter first avoids the aliasing a single big bicubic step gives
    # (see https://arxiv.org/abs/2104.11222).
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=_resample("BOX"))

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=_resample("BICUBIC")
    )

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0):
    """
    Resize so the short side is a random size between image_size / max_crop_frac and
    image_size / min_crop_frac, then take a random image_size square.
    """
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = random.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)

    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=_resample("BOX"))

    scale = smaller_dim_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=_resample("BICUBIC")
    )

    arr = np.array(pil_image)
    crop_y = random.randrange(arr.shape[0] - image_size + 1)
    crop_x = random.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]
