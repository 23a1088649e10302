"""
The base of the guided models (PAGGuidedModel in pag.py, SAGGuidedModel in sag.py): a wrapper that takes the
model's place in GaussianDiffusion's samplers, calls the model once more on a changed input or with changed
attention, and pushes the output's eps away from that second prediction.

What every method shares lives here: which rows of a batch a call guides (scale and t_range), the output-channel
check, putting the guided eps back with the plain pass's variance channels, and plain_and_guided, which gives DPS
(inverse.py) the unperturbed output beside the guided one with the second pass run without autograd.
"""

import math

import torch as th

from .perturbations import real_number


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
    try:
        lo, hi = t_range
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair (lo, hi) of numbers, got {t_range!r}") from None
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


class GuidedModel:
    """
    A model wrapper called like the model, `guided(x, t, **model_kwargs)`. Subclasses set `name` and implement
    describe() and _guided_eps(x, t, model_kwargs, rows, autograd): the plain output and the guided eps of the
    guided rows, from the plain pass and the method's second pass, which they may share work between.

    :param model: the wrapped model; its output has C channels (eps) or 2C (eps and the learned variance) for an
                  input of C channels; only eps is guided.
    :param scale: the method's scale s (any finite number; 0 turns it off).
    :param t_range: (lo, hi): guide only the rows whose timestep t, as the model receives it (original-scale
                    timesteps under respacing), satisfies lo <= t <= hi; other rows get the plain output.
    :param validated: scale is a finite float and t_range None or a pair of floats lo <= hi, as the specs of
                      guidance.py give them, so they are not checked again.
    """

    name = ""

    def __init__(self, model, scale, t_range=None, validated=False):
        self.model = model
        if validated:
            self.scale, self.t_range = float(scale), t_range
        else:
            self.scale = check_scale(scale, self.name)
            self.t_range = check_t_range(t_range)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{name}={value}' for name, value in self.settings())})"

    def settings(self):
        """
        (name, text) pairs for repr: the wrapper's settings.
        """
        return [("scale", self.scale), ("t_range", self.t_range)]

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
        return guided_rows(self.scale, self.t_range, t, batch_size)

    def __call__(self, x, t, **model_kwargs):
        rows = self.guided_rows(t, x.shape[0])
        if rows is None:
            return self.model(x, t, **model_kwargs)
        plain, guided = self._guided_eps(x, t, model_kwargs, rows, autograd=True)
        return self.recombine(plain, guided, rows)

    def plain_and_guided(self, x, t, **model_kwargs):
        """
        (unperturbed output, guided output) of one call, for samplers that need both, such as DPS taking its
        measurement gradient through the unperturbed x0 (see inverse.py). The second pass runs without autograd:
        gradients reach the model through the unperturbed output only, at no extra backward cost.
        """
        rows = self.guided_rows(t, x.shape[0])
        if rows is None:
            plain = self.model(x, t, **model_kwargs)
            return plain, plain
        plain, guided = self._guided_eps(x, t, model_kwargs, rows, autograd=False)
        return plain, self.recombine(plain, guided, rows)

    def _guided_eps(self, x, t, model_kwargs, rows, autograd):
        """
        (plain output, guided eps of the guided rows). With autograd False the second pass runs under no_grad.
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
