"""
Image output of the sampling scripts: model output to uint8 images, and a PNG grid to look at.
"""

import math
import os
import struct
import zlib

import numpy as np
import torch as th

from .atomic_io import atomic_write

# The grid written by --grid shows at most this many of the first samples.
GRID_MAX_IMAGES = 64


def to_uint8_images(sample):
    """
    Samples in [-1, 1], NCHW -> uint8 NHWC numpy, rounding as ADM does (scale, clamp, truncate).
    """
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)
    return sample.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_grid(images, padding=2):
    """
    uint8 NHWC images -> one uint8 HWC image: a near-square grid, `padding` black pixels around every image.
    """
    count, height, width, channels = images.shape
    ncol = math.ceil(math.sqrt(count))
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


def png_bytes(image):
    """
    Encode a uint8 HWC image (C = 1, 3 or 4) as PNG, with zlib alone, so that no imaging library is needed.
    """
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    # Every scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


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


def save_grid(path, images):
    data = png_bytes(image_grid(enlarge_small(images)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))
