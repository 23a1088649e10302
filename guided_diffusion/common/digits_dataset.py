"""
scikit-learn's bundled handwritten digits as images in ADM's layout, the data of the embedded toy model
(datasets/digits16.npz, written by scripts/make_digits_dataset.py).
"""

import numpy as np
import torch as th
import torch.nn.functional as F


def load_digits_images(image_size=16):
    """
    Return (images NHWC uint8 with 3 channels, labels int64) for all 1,797 digits.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset ships with scikit-learn: install it with `pip install scikit-learn`"
        ) from exc
    digits = load_digits()
    # Grey levels run 0..16 in the original scans.
    images = th.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(th.uint8)
    images = images.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous().numpy()
    return images, digits.target.astype(np.int64)
