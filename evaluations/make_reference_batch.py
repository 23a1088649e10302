"""
Build a reference batch in ADM's layout from your own data, so the evaluator can score samples
against it:

    python evaluations/make_reference_batch.py SOURCE OUT.npz [--image_size 256] [--num 10000]

SOURCE is a folder of images (searched recursively, as ADM's image_datasets does: jpg, jpeg,
png, gif), each converted to RGB and center-cropped and resized with ADM's center_crop_arr; or an
npz whose `arr_0` (or --key) holds NHWC uint8 images, which are copied (and center-cropped and
resized when --image_size differs from their size).

OUT.npz gets `arr_0` (N x H x W x C uint8) plus FID statistics computed with the feature network:
`mu`, `sigma` from pool features and `mu_s`, `sigma_s` from spatial features, and
`stats_feature_net`, `stats_feature_weights` naming the network and a digest of its weights (the
evaluator uses the statistics only with that same network). --no_stats writes the images only (no weights needed).
Images are streamed in and out, so large batches never sit in memory whole.
"""

import os
import sys

import numpy as np
from tqdm.auto import tqdm

from evaluations.device import resolve_device
from evaluations.feature_nets import (
    embed_batch,
    load_cli_feature_net,
    net_channels,
    net_identity,
    net_name,
)
from evaluations.frechet import compute_statistics
from evaluations.npz_io import IMAGE_KEY, BatchFormatError, NpzImageReader, NpzWriter
from evaluations.output_paths import check_output_file
# The same crop-and-resize recipe the training data loader uses, so a reference batch matches training data.
from guided_diffusion.common.errors import OneLineErrorParser
from guided_diffusion.image_datasets import IMAGE_EXTENSIONS, center_crop_arr, list_image_files


def _import_pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "reading image files and resizing needs Pillow, which is not a dependency of this "
            "package: pip install pillow"
        ) from None
    return Image


def _to_array(pil_image, image_size, channels):
    pil_image = pil_image.convert("RGB" if channels == 3 else "L")
    if image_size is not None:
        arr = center_crop_arr(pil_image, image_size)
    else:
        arr = np.array(pil_image)
    return arr if arr.ndim == 3 else arr[..., None]


def _load_image(path, image_size, channels):
    Image = _import_pil()
    try:
        with Image.open(path) as img:
            img.load()
            return _to_array(img, image_size, channels)
    except (OSError, ValueError) as exc:
        raise BatchFormatError(f"{path}: cannot read image ({exc})") from None


def _choose(total, num, seed, source):
    """
    Indices of the images to keep: the first num, or num random ones when seed is given. Asking for more images
    than the source holds is an error, not a smaller batch: a reference of another size moves FID (its bias
    depends on the count) and precision/recall, and would be compared with figures measured on the full count.
    """
    if num is not None and num > total:
        raise BatchFormatError(
            f"--num {num}, but {source} holds only {total} images; pass --num {total} or fewer, or leave "
            "--num out to take them all"
        )
    if num is None or num == total:
        return np.arange(total)
    if seed is None:
        return np.arange(num)
    return np.sort(np.random.default_rng(seed).choice(total, size=num, replace=False))


class FolderSource:
    def __init__(self, folder, image_size, channels):
        if image_size is None:
            raise ValueError("--image_size is required for a folder of images")
        self.files = list_image_files(folder)
        if not self.files:
            raise BatchFormatError(
                f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found"
            )
        self.image_size = image_size
        self.channels = channels
        self.total = len(self.files)
        self.image_shape = (image_size, image_size, channels)

    def iter_batches(self, indices, batch_size):
        for i in range(0, len(indices), batch_size):
            chunk = indices[i : i + batch_size]
            yield np.stack([_load_image(self.files[j], self.image_size, self.channels) for j in chunk])

    def close(self):
        pass


class NpzSource:
    def __init__(self, path, key, image_size, channels):
        self.reader = NpzImageReader(path, key, channels=None if channels is None else (channels,))
        self.path = path
        self.total = self.reader.num_images
        _, h, w, c = self.reader.shape
        self.resize = image_size is not None and (h, w) != (image_size, image_size)
        self.image_size = image_size
        self.image_shape = (image_size, image_size, c) if self.resize else (h, w, c)

    def iter_batches(self, indices, batch_size):
        wanted = np.zeros(self.total, dtype=bool)
        wanted[indices] = True
        pending = []
        start = 0
        for batch in self.reader.iter_batches(max(batch_size, 256)):
            keep = batch[wanted[start : start + len(batch)]]
            start += len(batch)
            if self.resize:
                keep = np.stack([self._resize(img) for img in keep]) if len(keep) else keep
            pending.extend(np.asarray(keep, dtype=np.uint8))
            while len(pending) >= batch_size:
                yield np.stack(pending[:batch_size])
                pending = pending[batch_size:]
        if pending:
            yield np.stack(pending)

    def _resize(self, img):
        Image = _import_pil()
        channels = img.shape[-1]
        pil = Image.fromarray(img[..., 0] if channels == 1 else img)
        arr = center_crop_arr(pil, self.image_size)
        return arr if arr.ndim == 3 else arr[..., None]

    def close(self):
        self.reader.close()


def open_source(source, key=IMAGE_KEY, image_size=None, channels=3):
    if os.path.isdir(source):
        return FolderSource(source, image_size, channels)
    if os.path.isfile(source):
        return NpzSource(source, key, image_size, channels)
    raise FileNotFoundError(f"{source}: no such folder or npz file")


def make_reference_batch(
    source,
    out_path,
    image_size=None,
    num=None,
    seed=None,
    feature_net=None,
    device="cpu",
    batch_size=64,
    key=IMAGE_KEY,
    channels=3,
    progress=True,
):
    """
    Write a reference batch to out_path; with a feature_net, also its FID statistics.
    Returns a dict with the number of images and the statistics written.
    """
    if num is not None and num < 1:
        raise ValueError(f"--num must be positive, got {num}")
    check_output_file(out_path, f"output {out_path}")
    if feature_net is not None:
        allowed = net_channels(feature_net)
        if allowed is not None and channels not in allowed:
            raise ValueError(
                f"feature network {net_name(feature_net)!r} takes {allowed} channels, not {channels}"
            )
    src = open_source(source, key=key, image_size=image_size, channels=channels)
    try:
        indices = _choose(src.total, num, seed, source)
        if feature_net is not None and len(indices) < 2:
            raise BatchFormatError(f"{source}: need at least 2 images for statistics")
        pools, spatials = [], []
        with NpzWriter(out_path) as writer:
            shape = (len(indices),) + tuple(src.image_shape)
            with writer.stream_array(IMAGE_KEY, shape, np.uint8) as stream:
                batches = src.iter_batches(indices, batch_size)
                total = -(-len(indices) // batch_size)
                for batch in tqdm(batches, total=total, desc="images", disable=not progress):
                    if batch.shape[1:] != shape[1:]:
                        raise BatchFormatError(
                            f"{source}: images of shape {batch.shape[1:]} where {shape[1:]} "
                            "was expected"
                        )
                    stream.write(batch)
                    if feature_net is not None:
                        pool, spatial = embed_batch(feature_net, batch, device)
                        pools.append(pool)
                        spatials.append(spatial)
            result = {"num_images": len(indices)}
            if feature_net is not None:
                stats = compute_statistics(np.concatenate(pools))
                result.update(mu=stats.mu, sigma=stats.sigma)
                if spatials[0] is not None:
                    stats_s = compute_statistics(np.concatenate(spatials))
                    result.update(mu_s=stats_s.mu, sigma_s=stats_s.sigma)
                for name in ("mu", "sigma", "mu_s", "sigma_s"):
                    if name in result:
                        writer.write_array(name, result[name])
                name, weights = net_identity(feature_net)
                writer.write_array("stats_feature_net", np.array(name))
                writer.write_array("stats_feature_weights", np.array(weights))
        return result
    finally:
        src.close()


def create_argparser():
    parser = OneLineErrorParser(
        prog="make_reference_batch.py",
        description="Build an ADM-style reference batch (arr_0 plus FID statistics)."
    )
    parser.add_argument("source", help="a folder of images or an npz with NHWC uint8 images")
    parser.add_argument("out", help="output npz path")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="center-crop and resize to this size (ADM's center_crop_arr); required for folders",
    )
    parser.add_argument("--num", type=int, default=None, help="keep this many images")
    parser.add_argument(
        "--seed", type=int, default=None, help="with --num: pick a random subset with this seed"
    )
    parser.add_argument("--key", default=IMAGE_KEY, help="image array in a source npz")
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=3,
        help="channels of the images written: 3 (RGB, default) or 1 (grayscale)",
    )
    parser.add_argument("--no_stats", action="store_true", help="write the images only")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--feature_net", default="inception", help="as for evaluator.py")
    parser.add_argument("--inception_path", default=None, help="as for evaluator.py")
    return parser


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    if os.path.isdir(args.source) and args.image_size is None:
        parser.error("--image_size is required for a folder of images")
    try:
        # Before the network loads and any image is read: an output that cannot be written is found now.
        check_output_file(args.out, f"output {args.out}")
        device = resolve_device(args.device)
        net = None
        if not args.no_stats:
            net = load_cli_feature_net(args.feature_net, device, args.inception_path)
        result = make_reference_batch(
            args.source,
            args.out,
            image_size=args.image_size,
            num=args.num,
            seed=args.seed,
            feature_net=net,
            device=device,
            batch_size=args.batch_size,
            key=args.key,
            channels=args.channels,
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"wrote {result['num_images']} images to {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
