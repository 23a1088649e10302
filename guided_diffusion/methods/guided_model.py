"""
The base of the guided models (PAGGuidedModel in pag.py, SAGGuidedModel in sag.py, AutoguidedModel in
autoguidance.py): a wrapper that takes the model's place in GaussianDiffusion's samplers, calls the model once more
on a changed input or with changed attention (or a weaker model), and pushes the output's eps away from that second
prediction.

What every method shares lives here: which rows of a batch a call guides and at which scale (scale, t_range and the
schedule of schedules.py), the output-channel check, putting the guided eps back with the plain pass's variance
channels, and plain_and_guided, which gives DPS (inverse.py) the unperturbed output beside the guided one with the
second pass run without autograd.
"""

import math

import torch as th

from .perturbations import real_number
from .schedules import ScaleSchedule, number_pair


def check_scale(scale, method):
    """
    A guidance scale as a float: any finite real number (a one-element tensor too).
    """
    return real_number(scale, f"{method} scale")


def check_t_range(t_range):
    """
    None, or a pair (lo, hi) of floats with lo <= hi.
    """
    if t_range is None:
        return None
    lo, hi = number_pair(t_range, "t_range")
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"t_range must not contain NaN, got {t_range!r}")
    if lo > hi:
        raise ValueError(f"t_range must satisfy lo <= hi, got ({lo:g}, {hi:g})")
    return lo, hi


def guided_rows(scale, t_range, t, batch_size):
    """
    The rows a guidance with this scale and t_range acts on: None (no row), True (every row) or a LongTensor of
    row indices (those with lo <= t <= hi).
    """
    if scale == 0:
        return None
    if t_range is None:
        return True
    t = th.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(batch_size)
    lo, hi = t_range
    inside = (t >= lo) & (t <= hi)
    if bool(inside.all()):
        return True
    if not bool(inside.any()):
        return None
    return inside.nonzero().flatten()


def take_rows(value, rows, batch_size):
    """
    The guided rows of a batched tensor; anything else (non-tensors, non-batched tensors) unchanged.
    """
    if rows is True or not th.is_tensor(value) or value.dim() == 0 or value.shape[0] != batch_size:
        return value
    return value[rows]


def wrapped_call_cost(model, t):
    """
    The cost per row of t of calling `model`: its own call_cost where it has one (a guided model inside another),
    else 1.0, one plain call.
    """
    t = th.as_tensor(t)
    if hasattr(model, "call_cost"):
        return th.as_tensor(model.call_cost(t), dtype=th.float64).reshape(t.shape).cpu()
    return th.ones(t.shape, dtype=th.float64)


def broadcast_scale(scale, like):
    """
    A row scale as _guided_eps receives it (a float, or a float64 tensor with one entry per guided row) in a form
    that multiplies `like` (the guided rows' eps): the float itself, or the tensor in like's dtype and device,
    shaped [rows, 1, 1, ...].
    """
    if not th.is_tensor(scale):
        return scale
    return scale.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class GuidedModel:
    """
    A model wrapper called like the model, `guided(x, t, **model_kwargs)`. Subclasses set `name` and implement
    describe() and _guided_eps(x, t, model_kwargs, rows, autograd, scale): the plain output and the guided eps of
    the guided rows, from the plain pass and the method's second pass, which they may share work between. `scale`
    is the scale of the guided rows: a float (the same for every row; with a constant schedule, self.scale itself)
    or a float64 tensor with one entry per guided row (broadcast_scale makes it multiply eps).

    :param model: the wrapped model; its output has C channels (eps) or 2C (eps and the learned variance) for an
                  input of C channels; only eps is guided.
    :param scale: the method's scale s (any finite number; 0 turns it off).
    :param t_range: (lo, hi): guide only the rows whose timestep t, as the model receives it (original-scale
                    timesteps under respacing), satisfies lo <= t <= hi; other rows get the plain output.
    :param validated: ignored, for callers written when the flag specs skipped these checks: the values are
                      checked here only (guidance.py calls the same check functions for its flags).
    :param schedule: a schedules.ScaleSchedule (how the scale varies over the steps); None: constant.
    """

    name = ""

    def __init__(self, model, scale, t_range=None, validated=False, schedule=None):
        self.model = model
        self.scale = check_scale(scale, self.name)
        self.t_range = check_t_range(t_range)
        if schedule is None:
            schedule = ScaleSchedule()
        elif not isinstance(schedule, ScaleSchedule):
            raise TypeError(f"schedule must be a schedules.ScaleSchedule or None, got {type(schedule).__name__}")
        self.schedule = schedule

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{name}={value}' for name, value in self.settings())})"

    def settings(self):
        """
        (name, text) pairs for repr: the wrapper's settings.
        """
        return [("scale", self.scale), ("t_range", self.t_range), ("schedule", repr(self.schedule.describe()))]

    def describe(self):
        """
        One line for logs and messages.
        """
        raise NotImplementedError

    def nonfinite_hint(self):
        """
        What may make this guidance give NaN, for the samplers' non-finite guard ("" when nothing is known).
        """
        return ""

    def parameters(self, recurse=True):
        """
        The wrapped model's parameters, so code that finds the device from them (as ADM's samplers do) works.
        """
        return self.model.parameters(recurse)

    def guided_rows(self, t, batch_size):
        """
        The rows to guide: None (no row), True (every row) or a LongTensor of row indices.
        """
        return self.row_scales(t, batch_size)[0]

    def row_scales(self, t, batch_size):
        """
        (rows, scale): the rows to guide (None, True or a LongTensor of row indices: those inside t_range whose
        scheduled scale is nonzero) and their scale (a float when all are guided alike, else a float64 tensor
        with one entry per guided row).
        """
        rows = guided_rows(self.scale, self.t_range, t, batch_size)
        if rows is None or self.schedule.constant:
            return rows, self.scale
        scales = self.schedule.scales(self.scale, t, batch_size)
        keep = scales != 0
        if rows is not True:
            inside = th.zeros_like(keep)
            inside[rows.to(keep.device)] = True
            keep &= inside
        if not bool(keep.any()):
            return None, 0.0
        if bool(keep.all()):
            rows, chosen = True, scales
        else:
            rows = keep.nonzero().flatten()
            chosen = scales[rows]
            rows = rows.to(th.as_tensor(t).device)
        if bool((chosen == chosen[0]).all()):
            return rows, float(chosen[0])
        return rows, chosen

    def call_cost(self, t):
        """
        What one call at timesteps t costs, per row of t, in plain forward passes of the main model: a float64
        tensor of t's shape (one row for a scalar t), the wrapped model's own cost where this method does not
        guide (outside t_range, or where the schedule's scale is 0), and where it guides that cost plus its second
        pass's. The base counts the second pass as one more full call of the wrapped model; methods that share
        work between the passes (PAG) override second_pass_cost, those that call another network (autoguidance)
        call_cost itself, with cost_rows.
        """
        t = th.as_tensor(t)
        rows_t, index = self.cost_rows(t)
        inner = wrapped_call_cost(self.model, rows_t)
        cost = inner.clone()
        if index is not None:
            cost[index] = inner[index] + self.second_pass_cost() * inner[index]
        return cost.reshape(t.shape)

    def cost_rows(self, t):
        """
        (t as a CPU row vector, an index of its guided rows or None): the rows a call at t guides, following the
        schedule (a row whose scheduled scale is 0 at t is not guided and costs one plain call), for call_cost.
        """
        rows_t = (t.reshape(-1) if t.dim() else t.reshape(1)).cpu()
        rows = self.guided_rows(rows_t, rows_t.shape[0])
        if rows is None:
            return rows_t, None
        return rows_t, slice(None) if rows is True else rows.cpu()

    def second_pass_cost(self):
        """
        The cost of the method's second pass, in calls of the wrapped model (1.0: one full call).
        """
        return 1.0

    def __call__(self, x, t, **model_kwargs):
        rows, scale = self.row_scales(t, x.shape[0])
        if rows is None:
            return self.model(x, t, **model_kwargs)
        plain, guided = self._guided_eps(x, t, model_kwargs, rows, autograd=True, scale=scale)
        return self.recombine(plain, guided, rows)

    def plain_and_guided(self, x, t, **model_kwargs):
        """
        (unperturbed output, guided output) of one call, for samplers that need both, such as DPS taking its
        measurement gradient through the unperturbed x0 (see inverse.py). The second pass runs without autograd:
        gradients reach the model through the unperturbed output only, at no extra backward cost.
        """
        rows, scale = self.row_scales(t, x.shape[0])
        if rows is None:
            plain = self.model(x, t, **model_kwargs)
            return plain, plain
        plain, guided = self._guided_eps(x, t, model_kwargs, rows, autograd=False, scale=scale)
        return plain, self.recombine(plain, guided, rows)

    def _guided_eps(self, x, t, model_kwargs, rows, autograd, scale):
        """
        (plain output, guided eps of the guided rows) at the rows' `scale` (see the class docstring). With
        autograd False the second pass runs under no_grad.
        """
        raise NotImplementedError

    def check_channels(self, x, output):
        """
        The eps channels of the model's output for input x; reject an output that is neither eps nor eps and a
        variance.
        """
        channels = x.shape[1]
        if output.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"model output has {output.shape[1]} channels; {self.name} expects {channels} (eps) or "
                f"{2 * channels} (eps and variance) for an input with {channels} channels"
            )
        return channels

    def recombine(self, plain, guided, rows):
        """
        The plain output with the guided eps in the guided rows' eps channels; the other channels (the learned
        variance) and rows stay the plain pass's.
        """
        channels = guided.shape[1]
        if rows is True:
            return th.cat([guided, plain[:, channels:]], dim=1)
        out = plain.clone()
        out[rows, :channels] = guided
        return out
