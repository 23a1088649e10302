"""
Improved precision and recall (Kynkäänniemi et al., 2019) as computed by ADM's evaluator.

Each feature vector gets a ball whose squared radius is the squared distance to its k-th nearest
neighbour (k=3) within its own set. Precision is the fraction of samples inside some reference
ball, recall the fraction of references inside some sample ball. Squared Euclidean distances are
computed in float16 and recomputed in float32 for any block where a float16 value is not finite,
in blocks of 10,000 rows and columns, as ADM does.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import strict_float32


def _squared_distances(u, v):
    norm_u = (u * u).sum(1)
    norm_v = (v * v).sum(1)
    return (norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :]).clamp_min(0)


def _squared_distances_fp16(u, v):
    """
    TensorFlow's float16 version of _squared_distances: inputs rounded to float16, the sums and
    the matrix product accumulated in float32 and rounded to float16 (as TF's GPU kernels do),
    element-wise arithmetic in float16. The float32 matmul on float16-exact inputs keeps this
    deterministic and fast on CPUs, which have no fast float16 matmul.
    """
    u = u.half().float()
    v = v.half().float()
    norm_u = (u * u).sum(1).half()
    norm_v = (v * v).sum(1).half()
    uv = (u @ v.T).half()
    return (norm_u[:, None] - 2 * uv + norm_v[None, :]).clamp_min(0)


def pairwise_distances(u, v):
    """
    Squared Euclidean distances between the rows of u [N x D] and v [M x D] as a float32
    [N x M] tensor: float16 values when they are all finite, else a float32 recomputation.
    """
    d16 = _squared_distances_fp16(u, v)
    if torch.isfinite(d16).all():
        return d16.float()
    return _squared_distances(u.float(), v.float())


class ManifoldEstimator:
    def __init__(
        self,
        device="cpu",
        row_batch_size=10000,
        col_batch_size=10000,
        nhood_size=3,
        progress=True,
    ):
        self.device = torch.device(device)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_size = nhood_size
        self.progress = progress

    def _to_tensor(self, features):
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"expected an [N x D] feature array, got shape {features.shape}")
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)

    def _blocks(self, num_rows, num_cols, desc):
        pairs = [
            (r, c)
            for r in range(0, num_rows, self.row_batch_size)
            for c in range(0, num_cols, self.col_batch_size)
        ]
        return tqdm(pairs, desc=desc, disable=not self.progress or len(pairs) < 2, leave=False)

    def manifold_radii(self, features):
        """
        Squared distance from each vector to its k-th nearest neighbour in the same set: the
        (k+1)-th smallest distance of its row, the vector itself included (ADM's np.partition
        with kth=arange(k+1), column k).
        """
        feats = self._to_tensor(features)
        n = len(feats)
        k = self.nhood_size
        if n < k + 1:
            raise ValueError(
                f"need at least {k + 1} feature vectors for k={k} nearest neighbours, got {n}"
            )
        radii = torch.zeros(n, dtype=torch.float32)
        best = None
        with strict_float32():
            for r, c in self._blocks(n, n, "manifold radii"):
                if c == 0:
                    best = None
                block = pairwise_distances(
                    feats[r : r + self.row_batch_size], feats[c : c + self.col_batch_size]
                )
                cand = block if best is None else torch.cat([best, block], dim=1)
                best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
                if c + self.col_batch_size >= n:
                    radii[r : r + len(best)] = best[:, k].cpu()
        return radii.numpy()

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """
        :param features_1, radii_1: reference features [N1 x D] and their radii [N1].
        :param features_2, radii_2: sample features [N2 x D] and their radii [N2].
        :return: (precision, recall): the fraction of set 2 inside some ball of set 1, and the
                 fraction of set 1 inside some ball of set 2.
        """
        f1, f2 = self._to_tensor(features_1), self._to_tensor(features_2)
        r1 = torch.as_tensor(np.asarray(radii_1, dtype=np.float32)).reshape(-1).to(self.device)
        r2 = torch.as_tensor(np.asarray(radii_2, dtype=np.float32)).reshape(-1).to(self.device)
        # covered_1[i]: vector i of set 1 lies in some ball of set 2 (and vice versa).
        covered_1 = torch.zeros(len(f1), dtype=torch.bool, device=self.device)
        covered_2 = torch.zeros(len(f2), dtype=torch.bool, device=self.device)
        rows, cols = self.row_batch_size, self.col_batch_size
        with strict_float32():
            for b1, b2 in self._blocks(len(f1), len(f2), "precision/recall"):
                dist = pairwise_distances(f1[b1 : b1 + rows], f2[b2 : b2 + cols])
                covered_1[b1 : b1 + rows] |= (dist <= r2[None, b2 : b2 + cols]).any(dim=1)
                covered_2[b2 : b2 + cols] |= (dist <= r1[b1 : b1 + rows, None]).any(dim=0)
        precision = float(covered_2.double().mean())
        recall = float(covered_1.double().mean())
        return precision, recall


def compute_prec_recall(ref_features, sample_features, **kwargs):
    """Precision and recall of sample_features against ref_features (ADM's argument order)."""
    if np.shape(ref_features)[1:] != np.shape(sample_features)[1:]:
        raise ValueError(
            f"feature dimensions differ: {np.shape(ref_features)} vs {np.shape(sample_features)}"
        )
    estimator = ManifoldEstimator(**kwargs)
    radii_ref = estimator.manifold_radii(ref_features)
    radii_sample = estimator.manifold_radii(sample_features)
    return estimator.evaluate_pr(ref_features, radii_ref, sample_features, radii_sample)
