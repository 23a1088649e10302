"""
The one hook of an attention block (AttentionBlock.hook): what a guidance method changes in, or reads from, the
block's forward pass. A block's hook is None (the block is ADM's) or an AttentionHook; guidance code never edits
a hook in place but sets a new one for the duration of a context (hooked) and puts the previous one back.

The row selection of a hook is normalised here, once: the block sees None (every row) or a bool mask over the
batch.
"""

import contextlib
import dataclasses

import torch as th


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionHook:
    """
    :param perturbation: None (the block's own attention map) or an AttentionPerturbation of perturbations.py
                         applied to the map of the selected rows (the identity: the output is V, no map computed).
    :param rows: with a perturbation, the rows it applies to: None (every row) or a bool mask [N] over the batch
                 (perturbation_rows turns other selections into one of these).
    :param capture: None, or called as capture(qkv, spatial_shape) on every forward before the attention (Self-
                    Attention Guidance reads the block's map from it); also when the backward pass recomputes a
                    forward, since the block binds its hook when the forward runs.
    """

    perturbation: object = None
    rows: object = None
    capture: object = None


def perturbation_rows(rows, batch_size=None, device=None):
    """
    A row selection as AttentionHook.rows: None (every row) or a bool mask [N].

    :param rows: True or None (every row), a bool mask [N], or, given batch_size, an index tensor or a slice.
    :raises ValueError: for another kind of value, or indices or a slice without batch_size.
    """
    if rows is None or rows is True:
        return None
    if isinstance(rows, slice) or (th.is_tensor(rows) and rows.dtype != th.bool):
        if batch_size is None:
            raise ValueError("perturbation rows given as indices or a slice need batch_size (or pass a bool mask)")
        mask = th.zeros(batch_size, dtype=th.bool, device=device)
        mask[rows] = True
        rows = mask
    if not th.is_tensor(rows) or rows.dtype != th.bool or rows.dim() != 1:
        raise ValueError(f"perturbation rows must be True, a bool mask [N], an index tensor or a slice, got {rows!r}")
    if device is not None:
        rows = rows.to(device)
    return rows


@contextlib.contextmanager
def hooked(blocks, **fields):
    """
    Within the context, each block's hook has these AttentionHook fields (the other fields as they were); the
    previous hooks are back on exit, also when the body raises. Yields the blocks.
    """
    blocks = list(blocks)
    previous = [block.hook for block in blocks]
    try:
        for block, hook in zip(blocks, previous):
            block.hook = dataclasses.replace(hook or AttentionHook(), **fields)
        yield blocks
    finally:
        for block, hook in zip(blocks, previous):
            block.hook = hook
