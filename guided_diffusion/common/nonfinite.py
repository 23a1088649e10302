"""
The samplers' guard against non-finite values: every sampling loop (ancestral, DDIM, DPS) checks each step's
x_{t-1} and stops at the first step that holds a NaN or Inf, so no image is ever computed from one (NaN and Inf
would otherwise become black or saturated uint8 pixels without a word).

The check is one isfinite().all() per step (one device-to-host sync); the message is built only when it fails.
"""

import torch as th

from .random_streams import current_batch


class NonFiniteSampleError(RuntimeError):
    """
    A sampling step gave NaN or Inf. The message is one line naming the step, the timestep, the samples and the
    guidance in use; the scripts print it and exit with status 1, writing nothing from the batch.
    """


def describe_guidance(model, cond_fn=None):
    """
    The guidance a sampler's model (and cond_fn) applies, in words, for messages.
    """
    parts = []
    describe = getattr(model, "describe", None)
    if callable(describe):
        parts.append(describe())
    if cond_fn is not None:
        parts.append("classifier guidance (cond_fn)")
    return "; ".join(parts) if parts else "none"


def _timestep(diffusion, index):
    # Under respacing the loop counts the respaced steps; the model sees the original timestep.
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is None:
        return index
    return int(timestep_map[index])


def _sample_names(rows, batch_size):
    batch = current_batch()
    if batch is not None and len(batch.indices) == batch_size:
        indices = [batch.indices[r] for r in rows]
        return "sample" + ("s" if len(indices) > 1 else ""), indices
    return "batch row" + ("s" if len(rows) > 1 else ""), rows


def check_finite(sample, diffusion, index, model, cond_fn=None, sampler="sampling"):
    """
    Raise NonFiniteSampleError if `sample` (the x_{t-1} of step `index`, counted as the loop counts, from
    num_timesteps - 1 down to 0) holds a NaN or Inf.
    """
    if bool(th.isfinite(sample).all()):
        return
    bad = (~th.isfinite(sample)).flatten(1).any(dim=1)
    rows = bad.nonzero().flatten().tolist()
    what, names = _sample_names(rows, sample.shape[0])
    shown = ", ".join(str(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
    steps = diffusion.num_timesteps
    message = (
        f"{sampler} stopped: step {steps - index} of {steps} (timestep {_timestep(diffusion, index)}) gave NaN/Inf "
        f"in {len(rows)} of {sample.shape[0]} samples ({what} {shown}); guidance: {describe_guidance(model, cond_fn)}"
    )
    hint = getattr(model, "nonfinite_hint", None)
    if callable(hint) and hint():
        message += f"; {hint()}"
    raise NonFiniteSampleError(message + "; nothing was written for this batch")
