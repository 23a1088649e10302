"""
Inception Score from class logits, as ADM's evaluator computes it: softmax of the logits,
then exp of the mean KL divergence between each prediction and the split's marginal, in splits
of 5000 predictions, averaged over splits.
"""

import numpy as np
import torch


def softmax(logits, batch_size=512):
    """Float32 softmax over the last axis, in batches (ADM feeds 512 rows at a time)."""
    logits = np.asarray(logits, dtype=np.float32)
    out = []
    for i in range(0, len(logits), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(logits[i : i + batch_size]))
        out.append(torch.softmax(chunk, dim=-1).numpy())
    if not out:
        return np.zeros((0,) + logits.shape[1:], dtype=np.float32)
    return np.concatenate(out, axis=0)


def inception_score_from_probs(preds, split_size=5000):
    """
    :param preds: an [N x C] array of class probabilities.

    Zero probabilities contribute 0 (the limit of p log p); ADM's formula would turn them into
    NaN, and for strictly positive inputs the arithmetic below is the same as ADM's.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or len(preds) == 0:
        raise ValueError(f"expected a non-empty [N x C] array of probabilities, got {preds.shape}")
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(marginal))
        kl = np.where(part > 0, kl, 0)
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score(logits, split_size=5000):
    return inception_score_from_probs(softmax(logits), split_size=split_size)
