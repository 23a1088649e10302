"""
Write scikit-learn's bundled handwritten digits as an image npz in ADM's layout (arr_0 NHWC uint8, arr_1 labels).

The 1,797 digits are 8x8 with 17 grey levels; they are upsampled bilinearly to --image_size and replicated to
three channels so ADM's RGB U-Net takes them unchanged. Nothing is downloaded: the images ship inside
scikit-learn (`pip install scikit-learn`).
"""

import argparse
import os

from guided_diffusion.common.atomic_io import save_npz_atomic
from guided_diffusion.common.digits_dataset import load_digits_images


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
