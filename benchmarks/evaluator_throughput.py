"""
Throughput of the evaluator's two heavy parts, printed from one run:
- feature extraction: images per second through the FID Inception-v3 (resize to 299 included),
- precision/recall: time of the k-NN radii and ball tests on synthetic [N x 2048] features
  (ADM's evaluator does this on 50k x 2048; on a few CPU cores that takes many minutes, so the
  default N is 50000 on CUDA and 10000 on CPU).

    python benchmarks/evaluator_throughput.py [--device cuda] [--num 50000] [--num_images 1024]

The real weights are used when --inception_path (or $PAG_ADM_INCEPTION_PATH, or the torch hub
folder) has them, random weights otherwise: the speed is the same.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from evaluations.device import default_device
from evaluations.feature_nets import embed_batch
from evaluations.inception import load_inception_feature_net, random_inception_feature_net
from evaluations.precision_recall import ManifoldEstimator


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def feature_throughput(args, device):
    try:
        net = load_inception_feature_net(args.inception_path)
        weights = "real weights"
    except FileNotFoundError:
        net = random_inception_feature_net()
        weights = "random weights"
    net = net.to(device).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(
        0, 256, size=(args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8
    )
    embed_batch(net, images[: min(2, args.batch_size)], device)  # warm-up (cuDNN autotune etc.)
    _sync(device)
    done = 0
    start = time.perf_counter()
    while done < args.num_images:
        count = min(args.batch_size, args.num_images - done)
        embed_batch(net, images[:count], device)
        done += count
    _sync(device)
    elapsed = time.perf_counter() - start
    print(
        f"feature extraction: {done / elapsed:.1f} images/s "
        f"({done} images of {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{weights}, device {device}, {elapsed:.2f} s)",
        flush=True,
    )


def prec_recall_time(args, device):
    rng = np.random.default_rng(1)
    # ReLU-like features of the scale of Inception's pool_3 (non-negative, ~0.3 on average).
    ref = np.abs(rng.normal(0, 0.4, size=(args.num, 2048))).astype(np.float32)
    sample = np.abs(rng.normal(0.02, 0.4, size=(args.num, 2048))).astype(np.float32)
    estimator = ManifoldEstimator(device=device, progress=True)
    _sync(device)
    start = time.perf_counter()
    radii_ref = estimator.manifold_radii(ref)
    radii_sample = estimator.manifold_radii(sample)
    _sync(device)
    radii_time = time.perf_counter() - start
    precision, recall = estimator.evaluate_pr(ref, radii_ref, sample, radii_sample)
    _sync(device)
    total = time.perf_counter() - start
    print(
        f"precision/recall on {args.num} x 2048 (each set): {total:.2f} s "
        f"(radii {radii_time:.2f} s, ball tests {total - radii_time:.2f} s; "
        f"precision {precision:.4f}, recall {recall:.4f}, device {device})",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument(
        "--num", type=int, default=None, help="feature vectors per set (default 50000 on CUDA, 10000 on CPU)"
    )
    parser.add_argument(
        "--num_images", type=int, default=None, help="images to embed (default 2048 on CUDA, 32 on CPU; 0 skips)"
    )
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    parser.add_argument("--inception_path", default=None)
    args = parser.parse_args()
    device = args.device or default_device()
    cuda = torch.device(device).type == "cuda"
    if args.num is None:
        args.num = 50000 if cuda else 10000
    if args.num_images is None:
        args.num_images = 2048 if cuda else 32
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    if args.num_images > 0:
        feature_throughput(args, device)
    if args.num > 0:
        prec_recall_time(args, device)


if __name__ == "__main__":
    main()
