"""
Image output of the sampling scripts: model output to uint8 images, and a grid of the first samples to look at,
written by Pillow in the format its file name asks for (.png, .jpg, ...).
"""

import io
import math
import os

import numpy as np
import torch as th

from ..common.atomic_io import atomic_write
from ..common.errors import UsageError

# The grid written by --grid shows at most this many of the first samples.
GRID_MAX_IMAGES = 64


def to_uint8_images(sample):
    """
    Samples in [-1, 1], NCHW -> uint8 NHWC numpy, rounding as ADM does (scale, clamp, truncate).
    """
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_grid(images, padding=2, ncol=None):
    """
    uint8 NHWC images -> one uint8 HWC image: a grid filled row by row, `ncol` images wide (default: near-square),
    `padding` black pixels around every image.
    """
    count, height, width, channels = images.shape
    ncol = ncol or math.ceil(math.sqrt(count))
    nrow = math.ceil(count / ncol)
    grid = np.zeros(
        (nrow * (height + padding) + padding, ncol * (width + padding) + padding, channels), dtype=np.uint8
    )
    for k, image in enumerate(images):
        row, col = divmod(k, ncol)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def enlarge_small(images, min_size=32, target=64):
    """
    Nearest-neighbour enlarge images smaller than min_size pixels to about target pixels, so a grid of 16x16
    samples can be looked at; larger images are left as they are.
    """
    size = max(images.shape[1:3])
    if size >= min_size:
        return images
    factor = max(1, target // size)
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def grid_format(path):
    """
    The Pillow format name a grid file's extension asks for, or a UsageError naming the ones that work.
    """
    from PIL import Image  # Pillow only where images are written: imported by the calls that need it

    Image.init()
    extension = os.path.splitext(path)[1].lower()
    fmt = Image.EXTENSION.get(extension)
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(
            f"--grid {path!r}: cannot tell the image format from {extension or 'a name without an extension'}; "
            "end the name with .png or .jpg"
        )
    return fmt


def image_bytes(image, fmt="PNG"):
    """
    Encode a uint8 HWC image (C = 1 or 3) in the given Pillow format.
    """
    from PIL import Image  # Pillow only where images are written: imported by the calls that need it

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def first_samples(arrays):
    """
    What --grid shows of a run's output arrays (arr_0, arr_1, ...): the first samples of arr_0.
    """
    return arrays[0][:GRID_MAX_IMAGES]


def save_grid(path, images, ncol=None, min_size=32):
    """
    Write a grid of uint8 NHWC images (enlarged when smaller than min_size pixels) atomically, in the format
    path's extension asks for.
    """
    data = image_bytes(image_grid(enlarge_small(images, min_size=min_size), ncol=ncol), grid_format(path))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def comparison_grid(panels, titles, strip=None, strip_title="", strip_ncol=8, ncol=8, gap=12, title_height=18):
    """
    uint8 HWC image of panels (uint8 NHWC image sets of one shape, e.g. the same seeds sampled without and with
    guidance) side by side, each a grid `ncol` images wide (enlarged when small) under its one-line title; an
    optional strip (uint8 NHWC, e.g. predictions at one step, `strip_ncol` wide) goes under the last panel, under
    its own title.
    """
    from PIL import Image, ImageDraw  # Pillow only where images are written

    def grid_of(images, ncol=ncol):
        grid = image_grid(enlarge_small(images), ncol=min(ncol, len(images)))
        return grid.repeat(3, axis=2) if grid.shape[2] == 1 else grid

    grids = [grid_of(images) for images in panels]
    top = max(g.shape[0] for g in grids) + title_height
    strip_grid = grid_of(strip, strip_ncol) if strip is not None and len(strip) else None
    height = top + (strip_grid.shape[0] + gap + title_height if strip_grid is not None else 0)
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for grid, title in zip(grids, titles):
        canvas.paste(Image.fromarray(np.ascontiguousarray(grid)), (left, title_height))
        draw.text((left + 2, 3), title, fill=(0, 0, 0))
        last_left = left
        left += grid.shape[1] + gap
    if strip_grid is not None:
        canvas.paste(Image.fromarray(np.ascontiguousarray(strip_grid)), (last_left, top + gap + title_height))
        draw.text((last_left + 2, top + gap + 3), strip_title, fill=(0, 0, 0))
    return np.asarray(canvas)
