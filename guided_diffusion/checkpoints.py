"""
Finding and loading the checkpoints the sampling scripts are given.
"""

import os

from .errors import UsageError


def resolve_checkpoint(path, flag, what, kind):
    """
    The checkpoint file behind `--flag path`, or a UsageError that says which file is needed and where to pass it.
    """
    if not path:
        raise UsageError(
            f"{flag} is required: pass the {what} checkpoint (a .pt file whose architecture matches the model "
            f"flags), e.g. {flag} models/64x64_{kind}.pt"
        )
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file; pass the path of an existing {what} checkpoint (.pt)")
    return path


def load_for_sampling(module, path, flag, what, use_fp16, device):
    """
    Load a checkpoint into a model or classifier (every rank together: dist_util reads it on rank 0 and
    broadcasts it), then move it to `device`, convert it to fp16 if asked and put it in eval mode, as ADM does.
    """
    from . import dist_util

    state = dist_util.load_state_dict(path, map_location="cpu")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(
            f"{flag} {path!r} does not fit the {what} built from the flags given (pass the flags the checkpoint "
            f"was trained with):\n{exc}"
        ) from None
    module.to(device)
    if use_fp16:
        module.convert_to_fp16()
    module.eval()
    return module
