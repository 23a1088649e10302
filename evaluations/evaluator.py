"""
Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, precision and
recall, numerically faithful to ADM's TensorFlow evaluator (evaluations/evaluator.py of
openai/guided-diffusion), in PyTorch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json out.json]

Both batches are npz files with NHWC uint8 images in `arr_0`. When the reference batch holds
`mu`, `sigma`, `mu_s`, `sigma_s`, those statistics are used for FID and sFID (precision and
recall still need the reference images). Reference activations are cached, so each reference
batch is embedded once per feature network.
"""

import argparse
import hashlib
import json
import os
import queue
import sys
import threading

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.atomic_io import write_json_atomic
from evaluations.device import default_device
from evaluations.feature_nets import (
    embed_batch,
    load_feature_net,
    net_channels,
    net_logits,
    net_name,
)
from evaluations.frechet import FIDStatistics, compute_statistics
from evaluations.inception_score import inception_score
from evaluations.npz_io import (
    IMAGE_KEY,
    BatchFormatError,
    NpzImageReader,
    NpzWriter,
    read_stats,
)
from evaluations.precision_recall import ManifoldEstimator

NHOOD_SIZE = 3
CACHE_ENV = "PAG_ADM_CACHE_DIR"
CACHE_VERSION = 1


def default_cache_dir():
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "pag_adm", "activations"
    )


class Activations:
    """Features of one batch: pool [N x D] and spatial [N x S] (None if the net has none)."""

    def __init__(self, pool, spatial=None):
        self.pool = pool
        self.spatial = spatial

    def __len__(self):
        return len(self.pool)


class ActivationCache:
    """
    Activations stored per (batch file, feature network). A batch file is identified by its
    absolute path, size and modification time, so a rewritten file is embedded again.
    """

    def __init__(self, directory):
        self.directory = directory

    def path_for(self, npz_path, net):
        st = os.stat(npz_path)
        ident = json.dumps(
            {
                "path": os.path.abspath(npz_path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "net": net_name(net),
                "version": CACHE_VERSION,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
        stem = os.path.splitext(os.path.basename(npz_path))[0]
        return os.path.join(self.directory, f"{stem}-{digest}.npz")

    def load(self, npz_path, net):
        path = self.path_for(npz_path, net)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as obj:
                spatial = obj["spatial"] if "spatial" in obj.files else None
                return Activations(obj["pool"], spatial)
        except (OSError, ValueError, KeyError):
            return None  # A damaged cache entry is recomputed and overwritten.

    def save(self, npz_path, net, acts):
        with NpzWriter(self.path_for(npz_path, net)) as writer:
            writer.write_array("pool", acts.pool)
            if acts.spatial is not None:
                writer.write_array("spatial", acts.spatial)


def prefetch(iterator, depth=2):
    """Read the next batches on a background thread while the current one is embedded."""
    q = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


class Evaluator:
    def __init__(
        self,
        feature_net,
        device="cpu",
        batch_size=64,
        cache_dir=None,
        progress=True,
        row_batch_size=10000,
        col_batch_size=10000,
        split_size=5000,
    ):
        self.net = feature_net
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_dir) if cache_dir else None
        self.progress = progress
        self.split_size = split_size
        self.manifold_estimator = ManifoldEstimator(
            device=self.device,
            row_batch_size=row_batch_size,
            col_batch_size=col_batch_size,
            nhood_size=NHOOD_SIZE,
            progress=progress,
        )
        self.embedded_batches = 0  # batches run through the network (lets tests see cache hits)

    def open_batch(self, npz_path):
        reader = NpzImageReader(npz_path, IMAGE_KEY, channels=net_channels(self.net))
        min_images = max(2, NHOOD_SIZE + 1)
        if reader.num_images < min_images:
            reader.close()
            raise BatchFormatError(
                f"{npz_path}: '{IMAGE_KEY}' holds {reader.num_images} images; the evaluator "
                f"needs at least {min_images} (k={NHOOD_SIZE} nearest neighbours for "
                "precision/recall, 2 for a covariance)"
            )
        return reader

    def read_activations(self, npz_path, use_cache=False):
        with self.open_batch(npz_path) as reader:
            if use_cache and self.cache is not None:
                acts = self.cache.load(npz_path, self.net)
                if acts is not None and len(acts) == reader.num_images:
                    return acts
            batches = prefetch(reader.iter_batches(self.batch_size))
            try:
                acts = self.compute_activations(batches, total=reader.num_batches(self.batch_size))
            finally:
                batches.close()  # stop the reading thread before the file closes
        if use_cache and self.cache is not None:
            self.cache.save(npz_path, self.net, acts)
        return acts

    def compute_activations(self, batches, total=None):
        """:param batches: an iterable of NHWC image arrays with values in [0, 255]."""
        pools, spatials = [], []
        for batch in tqdm(batches, total=total, desc="activations", disable=not self.progress):
            pool, spatial = embed_batch(self.net, batch, self.device)
            self.embedded_batches += 1
            pools.append(pool)
            spatials.append(spatial)
        if not pools:
            raise ValueError("no images to embed")
        spatial = None if spatials[0] is None else np.concatenate(spatials, axis=0)
        return Activations(np.concatenate(pools, axis=0), spatial)

    def read_statistics(self, npz_path, acts):
        """
        (pool statistics, spatial statistics or None). Precomputed statistics stored in the
        npz take precedence, as in ADM.
        """
        stored = read_stats(npz_path)
        if "mu" in stored and "sigma" in stored:
            pool_stats = FIDStatistics(stored["mu"], stored["sigma"])
            _check_stats_dim(npz_path, "mu", pool_stats, acts.pool)
        else:
            pool_stats = compute_statistics(acts.pool)
        spatial_stats = None
        if "mu_s" in stored and "sigma_s" in stored and acts.spatial is not None:
            spatial_stats = FIDStatistics(stored["mu_s"], stored["sigma_s"])
            _check_stats_dim(npz_path, "mu_s", spatial_stats, acts.spatial)
        elif acts.spatial is not None:
            spatial_stats = compute_statistics(acts.spatial)
        return pool_stats, spatial_stats

    @torch.no_grad()
    def compute_logits(self, pool, batch_size=512):
        out = []
        for i in range(0, len(pool), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(pool[i : i + batch_size]))
            logits = net_logits(self.net, chunk.to(self.device))
            if logits is None:
                return None
            out.append(logits.float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def compute_inception_score(self, pool):
        logits = self.compute_logits(pool)
        if logits is None:
            return None
        return inception_score(logits, split_size=self.split_size)

    def compute_prec_recall(self, ref_pool, sample_pool):
        radii_ref = self.manifold_estimator.manifold_radii(ref_pool)
        radii_sample = self.manifold_estimator.manifold_radii(sample_pool)
        return self.manifold_estimator.evaluate_pr(ref_pool, radii_ref, sample_pool, radii_sample)

    def evaluate(self, ref_batch, sample_batch, use_cache=True, log=None):
        log = log or (lambda msg: None)
        # Fail on a malformed sample batch before spending time on the reference batch.
        self.open_batch(sample_batch).close()
        log("computing reference batch activations...")
        ref_acts = self.read_activations(ref_batch, use_cache=use_cache)
        log("computing/reading reference batch statistics...")
        ref_stats, ref_stats_spatial = self.read_statistics(ref_batch, ref_acts)
        log("computing sample batch activations...")
        sample_acts = self.read_activations(sample_batch)
        log("computing/reading sample batch statistics...")
        sample_stats, sample_stats_spatial = self.read_statistics(sample_batch, sample_acts)
        if ref_acts.pool.shape[1] != sample_acts.pool.shape[1]:
            raise ValueError("reference and sample features have different dimensions")

        log("computing evaluations...")
        results = {
            "inception_score": self.compute_inception_score(sample_acts.pool),
            "fid": sample_stats.frechet_distance(ref_stats),
            "sfid": None,
        }
        if sample_stats_spatial is not None and ref_stats_spatial is not None:
            results["sfid"] = sample_stats_spatial.frechet_distance(ref_stats_spatial)
        results["precision"], results["recall"] = self.compute_prec_recall(
            ref_acts.pool, sample_acts.pool
        )
        results.update(
            ref_batch=os.path.abspath(ref_batch),
            sample_batch=os.path.abspath(sample_batch),
            num_ref=len(ref_acts),
            num_samples=len(sample_acts),
            feature_net=net_name(self.net),
        )
        return results


def _check_stats_dim(npz_path, key, stats, features):
    dim = features.shape[1]
    if np.shape(stats.mu) != (dim,) or np.shape(stats.sigma) != (dim, dim):
        raise BatchFormatError(
            f"{npz_path}: stored statistics '{key}' have shape {np.shape(stats.mu)} but the "
            f"feature network gives {dim}-d features; they were computed with another network"
        )


RESULT_LINES = (
    ("Inception Score", "inception_score"),
    ("FID", "fid"),
    ("sFID", "sfid"),
    ("Precision", "precision"),
    ("Recall", "recall"),
)


def format_results(results):
    lines = []
    for label, key in RESULT_LINES:
        value = results.get(key)
        lines.append(f"{label}: {value if value is not None else 'n/a'}")
    return "\n".join(lines)


def create_argparser():
    parser = argparse.ArgumentParser(
        description="IS, FID, sFID, precision and recall of a sample batch against a reference "
        "batch (ADM's evaluator in PyTorch)."
    )
    parser.add_argument("ref_batch", help="path to reference batch npz file")
    parser.add_argument("sample_batch", help="path to sample batch npz file")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--feature_net",
        default="inception",
        help="'inception', 'package.module:factory', 'file.py:factory' or a TorchScript file",
    )
    parser.add_argument(
        "--inception_path",
        default=None,
        help="pt_inception-2015-12-05-6726825d.pth (else $PAG_ADM_INCEPTION_PATH, else the "
        "torch hub checkpoint folder)",
    )
    parser.add_argument(
        "--cache_dir",
        default=None,
        help=f"where reference activations are cached (default: ${CACHE_ENV} or "
        "~/.cache/pag_adm/activations)",
    )
    parser.add_argument("--no_cache", action="store_true", help="do not read or write the cache")
    return parser


def main(argv=None):
    args = create_argparser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be positive")
    device = args.device or default_device()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        net = load_feature_net(args.feature_net, device=device, inception_path=args.inception_path)
        evaluator = Evaluator(
            net,
            device=device,
            batch_size=args.batch_size,
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        )
        results = evaluator.evaluate(
            args.ref_batch, args.sample_batch, use_cache=not args.no_cache, log=log
        )
    except (FileNotFoundError, BatchFormatError) as exc:
        raise SystemExit(f"error: {exc}")
    print(format_results(results), flush=True)
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
