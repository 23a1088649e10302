"""
Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, precision and
recall, numerically faithful to ADM's TensorFlow evaluator (evaluations/evaluator.py of
openai/guided-diffusion), in PyTorch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json out.json]

Both batches are npz files with NHWC uint8 images in `arr_0` (other dtypes are refused). FID and
sFID use the statistics `mu`, `sigma`, `mu_s`, `sigma_s` stored in the reference batch, as ADM
does, when they belong to the feature network: recorded as computed with it (name and weights
digest, as make_reference_batch.py writes them), or recording no network, as ADM's own reference
batches, and the network is the FID Inception. Otherwise they are computed from the batch's
images. --ref_stats stored insists on the stored ones, --ref_stats images always recomputes;
the output names which were used. Precision and recall always need the reference images.
Reference activations are cached, so each reference batch is embedded once per feature network.
"""

import hashlib
import json
import os
import queue
import sys
import threading

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.common.atomic_io import write_json_atomic
from guided_diffusion.common.errors import OneLineErrorParser
from evaluations.device import resolve_device
from evaluations.feature_nets import (
    embed_batch,
    load_cli_feature_net,
    net_channels,
    net_identity,
    net_is_fid_inception,
    net_logits,
)
from guided_diffusion.common.file_digest import file_digest
from evaluations.frechet import FIDStatistics, compute_statistics, singular_covariance_warning
from evaluations.inception_score import inception_score
from evaluations.kid import KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance
from evaluations.npz_io import (
    IMAGE_KEY,
    BatchFormatError,
    NpzImageReader,
    NpzWriter,
    read_stats,
)
from evaluations.output_paths import check_output_file
from evaluations.precision_recall import ManifoldEstimator

NHOOD_SIZE = 3
CACHE_ENV = "PAG_ADM_CACHE_DIR"
CACHE_VERSION = 3  # 2: keyed on the network's weights digest too; 3: on the batch's content digest
# Where FID/sFID statistics of the reference batch come from (--ref_stats): "auto" uses the stored ones when they
# belong to the feature network, "stored" requires them, "images" always computes them from the images.
REF_STATS_MODES = ("auto", "stored", "images")
# Bumped whenever the figures for the same inputs change meaning, so callers that cache results (reproduce.py)
# redo them. 2: ADM's stored reference statistics are used by default.
SCORING_VERSION = 2


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
    Activations stored per (batch content, feature network). A batch file is identified by the
    SHA-256 of its bytes (guided_diffusion.common.file_digest, remembered per path, size, mtime and ctime so a
    batch is hashed once), so a file replaced by other images is embedded again whatever its
    size and modification time; the network by its name and weights digest, so a retrained
    network of the same name is too.
    """

    def __init__(self, directory):
        self.directory = str(directory)

    def content_digest(self, npz_path):
        return file_digest(npz_path)

    def path_for(self, npz_path, identity):
        """
        :param identity: the network's (name, weights digest), as net_identity gives it.
        """
        name, weights = identity
        ident = json.dumps(
            {
                "content": self.content_digest(npz_path),
                "net": name,
                "weights": weights,
                "version": CACHE_VERSION,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
        # Named by content only, so the same batch under another name or folder shares the entry.
        return os.path.join(self.directory, f"activations-{digest}.npz")

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
        ref_stats="auto",
        kid_subsets=KID_SUBSETS,
        kid_subset_size=KID_SUBSET_SIZE,
    ):
        """
        :param ref_stats: where the reference batch's FID/sFID statistics come from, one of
            REF_STATS_MODES (see stats_source). "images" recomputes a sample batch's too.
        """
        if ref_stats not in REF_STATS_MODES:
            raise ValueError(f"ref_stats must be one of {', '.join(REF_STATS_MODES)}, got {ref_stats!r}")
        self.net = feature_net
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache = ActivationCache(cache_dir) if cache_dir else None
        self.progress = progress
        self.split_size = split_size
        self.ref_stats = ref_stats
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

    def read_activations(self, npz_path, use_cache=False, note=_print_note):
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
            try:
                self.cache.save(npz_path, self.identity, acts)
            except OSError as exc:
                # The work is done; an unwritable cache only costs the next run the embedding.
                note(
                    f"note: cannot write the activation cache in {self.cache.directory} "
                    f"({exc.strerror or type(exc).__name__}); continuing without it"
                )
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

    def stored_stats_refusal(self, npz_path, stored):
        """
        None when the statistics stored in a batch belong to this feature network, else why not: they
        record another network (name or weights), or they record none, which marks ADM's reference
        batches, whose statistics are the FID Inception's, and this network is not that one.
        """
        name, weights = self.identity
        stored_name = stored.get("stats_feature_net")
        stored_weights = stored.get("stats_feature_weights")
        if stored_name is None and stored_weights is None:
            if net_is_fid_inception(self.net):
                return None
            return (
                f"{npz_path}: its statistics (mu, sigma) record no feature network, so they are "
                f"taken to be the FID Inception's (as in ADM's reference batches), not {name!r}'s"
            )
        if stored_name == name and stored_weights == weights:
            return None
        return (
            f"{npz_path}: its statistics were computed with feature network {stored_name!r} "
            f"(weights {stored_weights}), not {name!r} (weights {weights})"
        )

    def stats_source(self, npz_path, stored, mode):
        """
        Where a batch's FID/sFID statistics come from under `mode` (REF_STATS_MODES):
        ("stored", None) for those stored in it, ("images", reason) to compute them from its images,
        with `reason` saying why stored ones are passed over (None when there are none, or under
        "images"). A request that cannot be met (stored statistics that are absent or not this
        network's under "stored", no images to compute from) is one BatchFormatError.
        """
        has_images = stored["has_images"]
        no_images = f"it holds no '{IMAGE_KEY}' images to compute them from"
        if mode == "images":
            if not has_images:
                raise BatchFormatError(f"{npz_path}: --ref_stats images, but {no_images}")
            return "images", None
        if "mu" not in stored or "sigma" not in stored:
            if mode == "stored":
                raise BatchFormatError(
                    f"{npz_path}: --ref_stats stored, but it holds no statistics (mu, sigma); "
                    "leave --ref_stats at auto to compute them from its images"
                )
            if not has_images:
                raise BatchFormatError(f"{npz_path}: no '{IMAGE_KEY}' images and no statistics (mu, sigma) to use")
            return "images", None
        reason = self.stored_stats_refusal(npz_path, stored)
        if reason is None:
            return "stored", None
        if mode == "stored":
            raise BatchFormatError(f"--ref_stats stored: {reason}; they are not used with it")
        if not has_images:
            raise BatchFormatError(f"{reason}, and {no_images}")
        return "images", reason

    def read_statistics(self, npz_path, acts, mode="auto", note=_print_note, stored=None):
        """
        (pool statistics, spatial statistics or None, {"pool": source, "spatial": source or None})
        where a source is "stored" or "images" (see stats_source). `acts` may be None for a batch
        of statistics only; `note` gets notes and warnings.
        """
        stored = read_stats(npz_path) if stored is None else stored
        source, reason = self.stats_source(npz_path, stored, mode)
        if reason is not None:
            note(f"note: {reason}; recomputed them from its {len(acts)} images")
        if source == "stored":
            pool_stats = FIDStatistics(stored["mu"], stored["sigma"])
            if acts is not None:
                _check_stats_dim(npz_path, "mu", pool_stats, acts.pool.shape[1])
        else:
            pool_stats = self._computed(npz_path, acts.pool, "FID", note)
        spatial_stats, spatial_source = None, None
        has_spatial = acts is None or acts.spatial is not None
        if source == "stored" and "mu_s" in stored and "sigma_s" in stored and has_spatial:
            spatial_stats, spatial_source = FIDStatistics(stored["mu_s"], stored["sigma_s"]), "stored"
            if acts is not None:
                _check_stats_dim(npz_path, "mu_s", spatial_stats, acts.spatial.shape[1])
        elif acts is not None and acts.spatial is not None:
            if source == "stored":
                note(
                    f"note: {npz_path} stores mu and sigma but no mu_s, sigma_s: sFID uses "
                    f"statistics of its {len(acts)} images"
                )
            spatial_stats = self._computed(npz_path, acts.spatial, "sFID", note)
            spatial_source = "images"
        return pool_stats, spatial_stats, {"pool": source, "spatial": spatial_source}

    @staticmethod
    def _computed(npz_path, features, metric, note):
        warning = singular_covariance_warning(len(features), features.shape[1], f"{npz_path} ({metric})")
        if warning is not None:
            note(warning)
        return compute_statistics(features)

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

        # Fail on a malformed sample batch, or a statistics request that cannot be met, before
        # spending time on the reference batch.
        with self.open_batch(sample_batch) as reader:
            sample_shape = reader.shape
        stored = read_stats(ref_batch)
        self.stats_source(ref_batch, stored, self.ref_stats)
        sample_mode = "images" if self.ref_stats == "images" else "auto"
        sample_stored = read_stats(sample_batch)
        self.stats_source(sample_batch, sample_stored, sample_mode)
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
            ref_acts = self.read_activations(ref_batch, use_cache=use_cache, note=add_note)
            # Stored statistics that do not fit the features stop the run before the samples are embedded.
            log("computing/reading reference batch statistics...")
            ref_stats, ref_stats_spatial, ref_sources = self.read_statistics(
                ref_batch, ref_acts, self.ref_stats, add_note, stored=stored
            )
        log("computing sample batch activations...")
        sample_acts = self.read_activations(sample_batch)
        log("computing/reading sample batch statistics...")
        if ref_acts is None:
            ref_stats, ref_stats_spatial, ref_sources = self.read_statistics(
                ref_batch, None, self.ref_stats, add_note, stored=stored
            )
            _check_stats_dim(ref_batch, "mu", ref_stats, sample_acts.pool.shape[1])
            if ref_stats_spatial is not None:
                if sample_acts.spatial is None:
                    ref_stats_spatial, ref_sources["spatial"] = None, None
                else:
                    _check_stats_dim(ref_batch, "mu_s", ref_stats_spatial, sample_acts.spatial.shape[1])
            add_note(
                f"note: {ref_batch} holds statistics but no images: precision and recall are n/a"
            )
        elif ref_acts.pool.shape[1] != sample_acts.pool.shape[1]:
            raise ValueError("reference and sample features have different dimensions")
        sample_stats, sample_stats_spatial, sample_sources = self.read_statistics(
            sample_batch, sample_acts, sample_mode, add_note, stored=sample_stored
        )

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
        if results["sfid"] is None:
            ref_sources["spatial"] = sample_sources["spatial"] = None
        name, weights = self.identity
        results.update(
            ref_batch=os.path.abspath(ref_batch),
            sample_batch=os.path.abspath(sample_batch),
            num_ref=None if ref_acts is None else len(ref_acts),
            num_samples=len(sample_acts),
            feature_net=name,
            feature_net_weights=weights,
            ref_stats=ref_sources["pool"],
            ref_stats_spatial=ref_sources["spatial"],
            sample_stats=sample_sources["pool"],
            sample_stats_spatial=sample_sources["spatial"],
            scoring_version=SCORING_VERSION,
            notes=notes,
        )
        log(describe_statistics(results))
        return results


def _check_stats_dim(npz_path, key, stats, dim):
    if np.shape(stats.mu) != (dim,) or np.shape(stats.sigma) != (dim, dim):
        sigma_key = "sigma" if key == "mu" else "sigma_s"
        raise BatchFormatError(
            f"{npz_path}: stored statistics '{key}', '{sigma_key}' have shapes {np.shape(stats.mu)}, "
            f"{np.shape(stats.sigma)} but the feature network gives {dim}-d features; they were "
            "computed with another network (--ref_stats images recomputes them from the images)"
        )


def describe_statistics(results):
    """One line naming the statistics FID and sFID were computed against."""

    def part(label, pool, spatial, count):
        from_images = f"computed from its {count} images" if count is not None else "computed from its images"
        if pool == "stored" and spatial in ("stored", None):
            keys = "mu, sigma, mu_s, sigma_s" if spatial == "stored" else "mu, sigma"
            return f"{label} stored in the batch ({keys})"
        if pool == "stored":
            return f"{label} stored in the batch for FID (mu, sigma), sFID's {from_images}"
        return f"{label} {from_images}"

    line = "Statistics: " + part(
        "reference", results["ref_stats"], results["ref_stats_spatial"], results["num_ref"]
    )
    if results["sample_stats"] == "stored":
        line += "; " + part(
            "samples", results["sample_stats"], results["sample_stats_spatial"], results["num_samples"]
        )
    return line


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
    if "ref_stats" in results:
        lines.append(describe_statistics(results))
    return "\n".join(lines)


def create_argparser():
    parser = OneLineErrorParser(
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
    stats = parser.add_mutually_exclusive_group()
    stats.add_argument(
        "--ref_stats",
        choices=REF_STATS_MODES,
        default="auto",
        help="the reference batch's FID/sFID statistics: auto (default) uses mu/sigma/mu_s/sigma_s "
        "stored in it when they belong to the feature network (recorded for it, or recording "
        "none, as ADM's reference batches, with the FID Inception), else computes them from its "
        "images; stored requires the stored ones (an error when they are absent or another "
        "network's); images always computes them from the images (a sample batch's too)",
    )
    stats.add_argument(
        "--use_stored_stats",
        dest="ref_stats",
        action="store_const",
        const="stored",
        help="the same as --ref_stats stored",
    )
    return parser


def main(argv=None):
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be positive, got {args.batch_size}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        if args.json:
            check_output_file(args.json, f"--json {args.json}")
        device = resolve_device(args.device)
        net = load_cli_feature_net(
            args.feature_net, device, args.inception_path, fast_gpu=args.fast_gpu
        )
        evaluator = Evaluator(
            net,
            device=device,
            batch_size=args.batch_size,
            cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
            ref_stats=args.ref_stats,
        )
        results = evaluator.evaluate(
            args.ref_batch, args.sample_batch, use_cache=not args.no_cache, log=log
        )
    except (FileNotFoundError, ValueError) as exc:
        # Bad input is one line and exit status 2, as argparse gives for bad flags.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(format_results(results), flush=True)
    if args.json:
        try:
            write_json_atomic(args.json, results)
        except OSError as exc:  # checked at the start; only a change since then gets here
            parser.exit(2, f"{parser.prog}: error: --json {args.json}: {exc.strerror or exc}\n")
    return results


if __name__ == "__main__":
    main()
