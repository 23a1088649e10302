"""
Finding and loading the checkpoints the sampling scripts are given.
"""

import os

from .. import dist_util
from ..common.assets import fetch_hint
from ..common.atomic_io import unwritable_reason
from ..common.errors import UsageError, not_found
from ..common.state_dict_check import describe_mismatch


def resolve_checkpoint(path, flag, what, kind):
    """
    The checkpoint file behind `--flag path`, or a UsageError that says which file is needed and where to pass it.
    """
    if not path:
        raise UsageError(
            f"{flag} is required: pass the {what} checkpoint (a .pt file whose architecture matches the model "
            f"flags), e.g. {flag} models/64x64_{kind}.pt"
        )
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder, not a file; pass the path of the {what} checkpoint (.pt)")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} (the {what} checkpoint, a .pt file): {not_found(path)}{fetch_hint(path)}")
    return path


def resolve_output_folder(path, flag):
    """
    Refuse an output folder that cannot be one (an existing file, a folder under a file) or cannot be written
    (tried with a probe file, which also catches read-only mounts) before anything runs.
    """
    if not path:
        return path
    reason = unwritable_reason(path)
    if reason:
        raise UsageError(f"{flag} {reason}; pass a folder for the outputs that you can write to")
    return path


def read_checkpoint(path, flag, what):
    """
    The state dict in a checkpoint file, read by rank 0 and broadcast (every rank must call this together), or a
    UsageError naming the file and what is wrong with it: unreadable (truncated, empty, not a PyTorch file) or not
    a state dict (e.g. a training checkpoint that wraps one).
    """
    try:
        state = dist_util.load_state_dict(path, map_location="cpu")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        kind = _file_kind(path)
        if kind is not None:
            raise UsageError(
                f"{flag} {path!r} is not a PyTorch checkpoint ({kind}): pass the {what} checkpoint (a .pt file)"
            ) from None
        # torch's first line, without its advice on weights_only (which is about trusting a pickle, not this file).
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]
        if "weights_only" in reason or "Weights only load failed" in reason:
            reason = "its pickled data cannot be read"
        raise UsageError(
            f"{flag} {path!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {reason}); the file may "
            f"be truncated or not a .pt file: pass the {what} checkpoint itself, or download it again"
        ) from None
    if _is_state_dict(state):
        return state
    raise UsageError(f"{flag} {path!r} holds {_describe_object(state)}, not a state dict of the {what}{_unwrap_hint(state)}")


# What every file torch.save writes starts with: a zip archive (torch >= 1.6) or a pickle (protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _file_kind(path):
    """
    None for a file that starts like a torch.save file (it may still be truncated), else what it is instead.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if not head:
        return "the file is empty"
    if head.startswith(_TORCH_MAGIC):
        return None
    try:
        head.decode("utf-8")
        return "it is a text file"
    except UnicodeDecodeError:
        return "it is neither a zip archive nor a pickle, the formats torch.save writes"


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _describe_object(obj):
    if isinstance(obj, dict):
        if not obj:
            return "an empty dict"
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        return f"a dict with keys {keys}"
    return f"a {type(obj).__name__}"


def _unwrap_hint(obj):
    # A training checkpoint often wraps the weights with other state; say which entry holds them.
    if not isinstance(obj, dict):
        return ""
    nested = [k for k, v in obj.items() if _is_state_dict(v)]
    if len(nested) != 1:
        return ""
    return (
        f"; its {nested[0]!r} entry looks like the weights: save that entry alone "
        f"(torch.save(torch.load(path)[{nested[0]!r}], new_path)) and pass the new file"
    )


def load_for_sampling(module, path, flag, what, use_fp16, device, flags=None):
    """
    Load a checkpoint into a model or classifier (every rank together: dist_util reads it on rank 0 and
    broadcasts it), then move it to `device`, convert it to fp16 if asked and put it in eval mode, as ADM does.

    :param flags: the flag names of the script, so that a mismatch is explained with the script's own flags.
    """
    state = read_checkpoint(path, flag, what)
    mismatch = describe_mismatch(module.state_dict(), state, flags=flags) if flags is not None else None
    try:
        if mismatch is not None:
            raise RuntimeError(mismatch)
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
