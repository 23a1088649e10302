"""
Write scikit-learn's bundled handwritten digits as an image npz in ADM's layout (arr_0 NHWC uint8, arr_1 labels).

The 1,797 digits are 8x8 with 17 grey levels; they are upsampled bilinearly to --image_size and replicated to
three channels so ADM's RGB U-Net takes them unchanged. Nothing is downloaded: the images ship inside
scikit-learn (`pip install scikit-learn`).
"""

import argparse
import os

import numpy as np
import torch as th
import torch.nn.functional as F

from guided_diffusion.atomic_io import save_npz_atomic


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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets", "digits16.npz"), help="output npz path")
    parser.add_argument("--image_size", type=int, default=16, help="size of the digit images (default: 16)")
    args = parser.parse_args()

    images, labels = load_digits_images(args.image_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_npz_atomic(args.out, {"arr_0": images, "arr_1": labels}, compressed=True)
    print(f"wrote {len(images)} digits of {args.image_size}x{args.image_size} to {args.out}")


if __name__ == "__main__":
    main()
