"""
Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, precision and
recall, numerically faithful to ADM's TensorFlow evaluator (evaluations/evaluator.py of
openai/guided-diffusion), in PyTorch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json out.json]

Both batches are npz files with NHWC uint8 images in `arr_0` (other dtypes are refused). When
the reference batch holds `mu`, `sigma`, `mu_s`, `sigma_s` recorded as computed with the same
feature network (name and weights digest), those statistics are used for FID and sFID;
otherwise they are recomputed from its images (precision and recall always need the reference
images). Reference activations are cached, so each reference batch is embedded once per feature
network.
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
from evaluations.device import resolve_device
from evaluations.feature_nets import (
    embed_batch,
    load_cli_feature_net,
    net_channels,
    net_identity,
    net_logits,
)
from evaluations.frechet import FIDStatistics, compute_statistics
from evaluations.inception_score import inception_score
from evaluations.kid import KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance
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
CACHE_VERSION = 2  # 2: keyed on the network's weights digest too


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
    absolute path, size and modification time, so a rewritten file is embedded again; the
    network by its name and weights digest, so a retrained network of the same name is too.
    """

    def __init__(self, directory):
        self.directory = directory

    def path_for(self, npz_path, identity):
        """
        :param identity: the network's (name, weights digest), as net_identity gives it.
        """
        st = os.stat(npz_path)
        name, weights = identity
        ident = json.dumps(
            {
                "path": os.path.abspath(npz_path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "net": name,
                "weights": weights,
                "version": CACHE_VERSION,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
        stem = os.path.splitext(os.path.basename(npz_path))[0]
        return os.path.join(self.directory, f"{stem}-{digest}.npz")

    def load(self, npz_path, identity):
        path = self.path_for(npz_path, identity)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as obj:
                spatial = obj["spatial"] if "spatial" in obj.files else None
                return Activations(obj["pool"], spatial)
        except (OSError, ValueError, KeyError):
            return None  # A damaged cache entry is recomputed and overwritten.

    def save(self, npz_path, identity, acts):
        with NpzWriter(self.path_for(npz_path, identity)) as writer:
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


def _print_note(msg):
    print(msg, file=sys.stderr, flush=True)


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
        use_stored_stats=False,
        kid_subsets=KID_SUBSETS,
        kid_subset_size=KID_SUBSET_SIZE,
    ):
        """
        :param use_stored_stats: use mu/sigma stored in a batch that does not record the feature
            network they came from (ADM's own reference batches, whose statistics come from the
            TensorFlow graph). Statistics recorded for another network are never used.
        """
        self.net = feature_net
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_dir) if cache_dir else None
        self.progress = progress
        self.split_size = split_size
        self.use_stored_stats = use_stored_stats
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.manifold_estimator = ManifoldEstimator(
            device=self.device,
            row_batch_size=row_batch_size,
            col_batch_size=col_batch_size,
            nhood_size=NHOOD_SIZE,
            progress=progress,
        )
        self.embedded_batches = 0  # batches run through the network (lets tests see cache hits)
        self._identity = None

    @property
    def identity(self):
        """(name, weights digest) of the feature network, computed once."""
        if self._identity is None:
            self._identity = net_identity(self.net)
        return self._identity

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
                acts = self.cache.load(npz_path, self.identity)
                if acts is not None and len(acts) == reader.num_images:
                    return acts
            batches = prefetch(reader.iter_batches(self.batch_size))
            try:
                acts = self.compute_activations(batches, total=reader.num_batches(self.batch_size))
            finally:
                batches.close()  # stop the reading thread before the file closes
        if use_cache and self.cache is not None:
            self.cache.save(npz_path, self.identity, acts)
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

    def stored_stats_verdict(self, npz_path, stored):
        """
        Whether the statistics stored in a batch may be used with this feature network:
        (True, None) to use them, (False, reason) when they must not be (reason says why), and
        (False, None) when there are none.
        """
        if "mu" not in stored or "sigma" not in stored:
            return False, None
        name, weights = self.identity
        stored_name = stored.get("stats_feature_net")
        stored_weights = stored.get("stats_feature_weights")
        if stored_name is None and stored_weights is None:
            if self.use_stored_stats:
                return True, None
            return False, (
                f"{npz_path}: its statistics (mu, sigma) do not record the feature network they "
                f"came from (it may not be {name!r})"
            )
        if stored_name == name and stored_weights == weights:
            return True, None
        return False, (
            f"{npz_path}: its statistics were computed with feature network {stored_name!r} "
            f"(weights {stored_weights}), not {name!r} (weights {weights})"
        )

    def read_statistics(self, npz_path, acts, note=_print_note):
        """
        (pool statistics, spatial statistics or None). Statistics stored in the npz take
        precedence, as in ADM, when they were computed with this feature network (see
        stored_stats_verdict); otherwise they are computed from the activations and `note` says so.
        """
        stored = read_stats(npz_path)
        use, reason = self.stored_stats_verdict(npz_path, stored)
        if reason is not None:
            note(f"note: {reason}; recomputed them from its {len(acts)} images")
        if use:
            pool_stats = FIDStatistics(stored["mu"], stored["sigma"])
            _check_stats_dim(npz_path, "mu", pool_stats, acts.pool.shape[1])
        else:
            pool_stats = compute_statistics(acts.pool)
        spatial_stats = None
        if use and "mu_s" in stored and "sigma_s" in stored and acts.spatial is not None:
            spatial_stats = FIDStatistics(stored["mu_s"], stored["sigma_s"])
            _check_stats_dim(npz_path, "mu_s", spatial_stats, acts.spatial.shape[1])
        elif acts.spatial is not None:
            spatial_stats = compute_statistics(acts.spatial)
        return pool_stats, spatial_stats

    def check_stats_only_reference(self, npz_path, stored):
        """A reference batch without images is usable only when its statistics are this network's."""
        use, reason = self.stored_stats_verdict(npz_path, stored)
        if not use:
            if reason is None:
                raise BatchFormatError(
                    f"{npz_path}: no '{IMAGE_KEY}' images and no statistics (mu, sigma) to use"
                )
            raise BatchFormatError(f"{reason}, and it holds no '{IMAGE_KEY}' images to recompute them from")

    def read_stored_statistics_only(self, npz_path, stored, dims):
        self.check_stats_only_reference(npz_path, stored)
        pool_stats = FIDStatistics(stored["mu"], stored["sigma"])
        _check_stats_dim(npz_path, "mu", pool_stats, dims[0])
        spatial_stats = None
        if "mu_s" in stored and "sigma_s" in stored and dims[1] is not None:
            spatial_stats = FIDStatistics(stored["mu_s"], stored["sigma_s"])
            _check_stats_dim(npz_path, "mu_s", spatial_stats, dims[1])
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

    def evaluate(self, ref_batch, sample_batch, use_cache=True, log=None, note=_print_note):
        """
        :param log: progress lines (default: none).
        :param note: warnings and notes about how the batches were used (default: stderr);
            they are also returned under "notes".
        """
        log = log or (lambda msg: None)
        notes = []

        def add_note(msg):
            notes.append(msg)
            note(msg)

        # Fail on a malformed sample batch before spending time on the reference batch.
        with self.open_batch(sample_batch) as reader:
            sample_shape = reader.shape
        stored = read_stats(ref_batch)
        ref_acts = None
        if stored["has_images"]:
            with self.open_batch(ref_batch) as reader:
                ref_shape = reader.shape
            if ref_shape[1:3] != sample_shape[1:3]:
                add_note(
                    f"warning: reference images are {ref_shape[1]}x{ref_shape[2]} but samples are "
                    f"{sample_shape[1]}x{sample_shape[2]}; the network resizes both, so the "
                    "metrics also measure the resolution gap (ADM compares 256x256 samples with "
                    "ImageNet-256 references)"
                )
            log("computing reference batch activations...")
            ref_acts = self.read_activations(ref_batch, use_cache=use_cache)
        else:
            self.check_stats_only_reference(ref_batch, stored)
        log("computing sample batch activations...")
        sample_acts = self.read_activations(sample_batch)
        log("computing/reading statistics...")
        if ref_acts is not None:
            if ref_acts.pool.shape[1] != sample_acts.pool.shape[1]:
                raise ValueError("reference and sample features have different dimensions")
            ref_stats, ref_stats_spatial = self.read_statistics(ref_batch, ref_acts, add_note)
        else:
            dims = (sample_acts.pool.shape[1], None if sample_acts.spatial is None else sample_acts.spatial.shape[1])
            ref_stats, ref_stats_spatial = self.read_stored_statistics_only(ref_batch, stored, dims)
            add_note(
                f"note: {ref_batch} holds statistics but no images: precision and recall are n/a"
            )
        sample_stats, sample_stats_spatial = self.read_statistics(sample_batch, sample_acts, add_note)

        log("computing evaluations...")
        results = {
            "inception_score": self.compute_inception_score(sample_acts.pool),
            "fid": sample_stats.frechet_distance(ref_stats),
            "sfid": None,
            "precision": None,
            "recall": None,
            "kid_mean": None,
            "kid_std": None,
        }
        if sample_stats_spatial is not None and ref_stats_spatial is not None:
            results["sfid"] = sample_stats_spatial.frechet_distance(ref_stats_spatial)
        if ref_acts is not None:
            results["precision"], results["recall"] = self.compute_prec_recall(
                ref_acts.pool, sample_acts.pool
            )
            results["kid_mean"], results["kid_std"] = kernel_inception_distance(
                ref_acts.pool,
                sample_acts.pool,
                num_subsets=self.kid_subsets,
                subset_size=self.kid_subset_size,
                device=self.device,
            )
        name, weights = self.identity
        results.update(
            ref_batch=os.path.abspath(ref_batch),
            sample_batch=os.path.abspath(sample_batch),
            num_ref=None if ref_acts is None else len(ref_acts),
            num_samples=len(sample_acts),
            feature_net=name,
            feature_net_weights=weights,
            notes=notes,
        )
        return results


def _check_stats_dim(npz_path, key, stats, dim):
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
    if results.get("kid_mean") is None:
        lines.append("KID: n/a")
    else:
        lines.append(f"KID: {results['kid_mean']} ± {results['kid_std']}")
    return "\n".join(lines)


def create_argparser():
    parser = argparse.ArgumentParser(
        prog="evaluator.py",
        description="IS, FID, sFID, precision, recall and KID of a sample batch against a reference "
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
    parser.add_argument(
        "--fast_gpu",
        action="store_true",
        help="CUDA only: let the Inception network use TF32 and float16, which is faster but "
        "moves the figures (see evaluations/README.md); the default is float32 with TF32 off",
    )
    parser.add_argument(
        "--use_stored_stats",
        action="store_true",
        help="use mu/sigma stored in a batch that does not record its feature network (ADM's own "
        "reference batches, whose statistics come from the TensorFlow graph); by default they "
        "are recomputed from the batch's images",
    )
    return parser


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        device = resolve_device(args.device)
        net = load_cli_feature_net(
            args.feature_net, device, args.inception_path, fast_gpu=args.fast_gpu
        )
        evaluator = Evaluator(
            net,
            device=device,
            batch_size=args.batch_size,
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
            use_stored_stats=args.use_stored_stats,
        )
        results = evaluator.evaluate(
            args.ref_batch, args.sample_batch, use_cache=not args.no_cache, log=log
        )
    except (FileNotFoundError, ValueError) as exc:
        # Bad input is one line and exit status 2, as argparse gives for bad flags.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(format_results(results), flush=True)
    if args.json:
        write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
