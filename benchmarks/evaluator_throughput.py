"""
Throughput of the evaluator's two heavy parts, printed from one run:
- feature extraction: images per second through the FID Inception-v3 (uint8 NHWC input, the
  resize to 299 included) for the fast network (evaluations/inception_fast.py, the default) and
  the unoptimised reference network (fast=False), measured in the same run, batches of the two
  interleaved so that load from other processes hits both alike; their ratio; and how far the
  fast features are from the reference ones,
- precision/recall: time of the k-NN radii and ball tests on synthetic [N x 2048] features.

    python benchmarks/evaluator_throughput.py [--device cuda] [--image_sizes 64 256]
        [--batch_size 50] [--num_images 50] [--num 5000] [--fast_gpu]

Random weights unless --inception_path (or $PAG_ADM_INCEPTION_PATH, or the torch hub folder)
has the real file: the speed is the same. --fast_gpu (CUDA) also measures the opt-in TF32 +
float16 mode and how far its features, and the FID between two halves of the images, move.
"""

import argparse
import time

import numpy as np
import torch

from evaluations.device import resolve_device
from evaluations.feature_nets import embed_batch, net_logits
from evaluations.frechet import compute_statistics
from evaluations.inception import load_inception_feature_net, random_inception_feature_net
from evaluations.precision_recall import ManifoldEstimator


def _sync(device):
    # The device the work ran on (--device cuda:N), not the current one (cuda:0 unless set).
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def build_nets(args, device):
    modes = {"fast": dict(fast=True), "unoptimised": dict(fast=False)}
    if args.fast_gpu:
        modes["fast_gpu"] = dict(fast=True, fast_gpu=True)
    nets = {}
    for label, kwargs in modes.items():
        try:
            net = load_inception_feature_net(args.inception_path, **kwargs)
            weights = "real weights"
        except FileNotFoundError:
            net = random_inception_feature_net(**kwargs)
            weights = "random weights"
        nets[label] = net.to(device).eval()
    return nets, weights


def _max_rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def feature_throughput(args, device, nets, weights, size):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, size=(args.batch_size, size, size, 3), dtype=np.uint8)
    outputs = {}
    for label, net in nets.items():  # warm-up (oneDNN/cuDNN kernel choice), and the features
        pool, spatial = embed_batch(net, images[:4], device)
        logits = net_logits(net, torch.from_numpy(pool).to(device)).float().cpu().numpy()
        outputs[label] = (pool, spatial, logits)
    _sync(device)
    elapsed = {label: 0.0 for label in nets}
    done = 0
    while done < args.num_images:
        count = min(args.batch_size, args.num_images - done)
        for label, net in nets.items():
            start = time.perf_counter()
            embed_batch(net, images[:count], device)
            _sync(device)
            elapsed[label] += time.perf_counter() - start
        done += count
    rates = {label: done / seconds for label, seconds in elapsed.items()}
    for label in nets:
        print(
            f"{size}x{size} {label:12s}: {rates[label]:7.2f} images/s "
            f"({done} images, {elapsed[label]:.1f} s)",
            flush=True,
        )
    ref = outputs["unoptimised"]
    for label in nets:
        if label == "unoptimised":
            continue
        print(
            f"{size}x{size} {label} / unoptimised: {rates[label] / rates['unoptimised']:.2f}x; "
            "max |difference| / max |reference| of pool_3 {:.1e}, mixed_6/conv {:.1e}, "
            "logits {:.1e}".format(*(_max_rel(a, b) for a, b in zip(outputs[label], ref))),
            flush=True,
        )
    if "fast_gpu" in nets:
        fid_move(args, device, nets, images)
    return rates


def fid_move(args, device, nets, images):
    """FID between two halves of the images with each mode: how far fast_gpu moves it."""
    half = len(images) // 2
    if half < 2:
        return
    fids = {}
    for label in ("fast", "fast_gpu"):
        pool_a = embed_batch(nets[label], images[:half], device)[0]
        pool_b = embed_batch(nets[label], images[half : 2 * half], device)[0]
        fids[label] = compute_statistics(pool_a).frechet_distance(compute_statistics(pool_b))
    print(
        f"FID between two halves of {2 * half} images: float32 {fids['fast']:.6f}, fast_gpu "
        f"{fids['fast_gpu']:.6f} (difference {fids['fast_gpu'] - fids['fast']:+.2e})",
        flush=True,
    )


def prec_recall_time(args, device):
    rng = np.random.default_rng(1)
    # ReLU-like features of the scale of Inception's pool_3 (non-negative, ~0.3 on average).
    ref = np.abs(rng.normal(0, 0.4, size=(args.num, 2048))).astype(np.float32)
    sample = np.abs(rng.normal(0.02, 0.4, size=(args.num, 2048))).astype(np.float32)
    estimator = ManifoldEstimator(device=device, progress=False)
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
        f"precision {precision:.4f}, recall {recall:.4f})",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument(
        "--num_images", type=int, default=None,
        help="images per network and size (default 1000 on CUDA, 50 on CPU; 0 skips)",
    )
    parser.add_argument(
        "--num", type=int, default=None,
        help="precision/recall feature vectors per set (default 50000 on CUDA, 5000 on CPU; 0 skips)",
    )
    parser.add_argument("--fast_gpu", action="store_true", help="also measure the TF32/float16 mode (CUDA)")
    parser.add_argument("--inception_path", default=None)
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    cuda = torch.device(device).type == "cuda"
    if args.fast_gpu and not cuda:
        parser.error("--fast_gpu needs --device cuda")
    if args.num is None:
        args.num = 50000 if cuda else 5000
    if args.num_images is None:
        args.num_images = 1000 if cuda else 50
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device} "
        f"({name}), batch {args.batch_size}",
        flush=True,
    )
    if args.num_images > 0:
        nets, weights = build_nets(args, device)
        print(f"Inception-v3 with {weights}, uint8 input, resize to 299 included", flush=True)
        for size in args.image_sizes:
            feature_throughput(args, device, nets, weights, size)
    if args.num > 0:
        prec_recall_time(args, device)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


if __name__ == "__main__":
    main()
