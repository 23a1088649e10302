"""
Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024) for ADM's
U-Net.

A second, weaker model of the same kind (the guide: smaller, shorter-trained, or both) is called on the same x_t,
t and labels, and the prediction is pushed away from the guide's:

    eps_guided = eps + s * (eps - eps_guide)

The reference (NVlabs/edm2 generate_images.py, edm_sampler's denoise) writes it in x0 space with the guidance
weight w: D = D_guide.lerp(D_main, w) = D_guide + w (D_main - D_guide). At a fixed x_t, x0 is an affine function of
eps with the same coefficients for both models, so the same rule holds for eps; with w = 1 + s it is the rule
above (s = w - 1 is PAG's convention, so one scale flag reads the same for every method; w = 1, s = 0, is the main
model alone, which EDM2 too samples without calling the guide). Only the first C output channels (eps) are guided;
the learned variance of learn_sigma models comes from the main model (the guide may have it or not).

The guide is a full model with its own checkpoint and architecture flags; it takes the main model's inputs
(image size, class labels, low_res for super-resolution) and timesteps, so it must have been trained on the same
diffusion (steps and noise schedule).
"""

import math

import torch as th
from torch.utils.flop_counter import FlopCounterMode

from .guided_model import GuidedModel, broadcast_scale, take_rows, wrapped_call_cost
from ..unet import SuperResModel


class AutoguidedModel(GuidedModel):
    """
    A model wrapper whose output is guided by a weaker model of the same kind; call it like the model,
    `guided(x, t, **model_kwargs)`, e.g. as the model of diffusion.p_sample_loop / ddim_sample_loop.

    :param model: the main model.
    :param guide: the weak model (the guide), called with the same arguments; its output has C or 2C channels.
    :param scale: s = w - 1, w being the paper's and EDM2's guidance weight (any finite number; 0 turns it off,
                  -1 gives the guide's prediction).
    :param t_range, validated, schedule: as for GuidedModel.
    :param cost_ratio: the cost of one guide call in main-model calls, for call_cost; None: counted once, on the
                       first call_cost, as the ratio of the two models' forward FLOPs (guide_cost_ratio).
    """

    name = "autoguidance"

    def __init__(self, model, guide, scale, t_range=None, validated=False, schedule=None, cost_ratio=None):
        super().__init__(model, scale, t_range, validated, schedule)
        if guide is None or not callable(guide):
            raise TypeError("autoguidance needs a guide model (a callable like the main model)")
        if cost_ratio is not None:
            cost_ratio = float(cost_ratio)
            if not (math.isfinite(cost_ratio) and cost_ratio >= 0):
                raise ValueError(f"autoguidance cost_ratio must be a finite number >= 0, got {cost_ratio!r}")
        self.guide = guide
        self._cost_ratio = cost_ratio

    def settings(self):
        return super().settings() + [("guide", type(self.guide).__name__)]

    def describe(self):
        interval = "all" if self.t_range is None else f"{self.t_range[0]:g}..{self.t_range[1]:g}"
        schedule = "" if self.schedule.constant else f", schedule {self.schedule.describe()}"
        return f"autoguidance (scale {self.scale:g}, w = {1 + self.scale:g}, t {interval}{schedule})"

    def _guided_eps(self, x, t, model_kwargs, rows, autograd, scale):
        n = x.shape[0]
        x_g, t_g = take_rows(x, rows, n), take_rows(t, rows, n)
        kwargs = {k: take_rows(v, rows, n) for k, v in model_kwargs.items()}
        if not autograd:
            # DPS takes its gradient through the plain pass only: the guide runs first, without autograd, so its
            # activations are freed before the plain pass builds its graph. The guide draws no random numbers.
            with th.no_grad():
                weak = self.guide(x_g, t_g, **kwargs)
            plain = self.model(x, t, **model_kwargs)
        else:
            plain = self.model(x, t, **model_kwargs)
            weak = self.guide(x_g, t_g, **kwargs)
        channels = self.check_channels(x, plain)
        if weak.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"the autoguidance guide's output has {weak.shape[1]} channels; expected {channels} (eps) or "
                f"{2 * channels} (eps and variance) for an input with {channels} channels"
            )
        eps = take_rows(plain, rows, n)[:, :channels]
        return plain, eps + broadcast_scale(scale, eps) * (eps - weak[:, :channels])

    @property
    def cost_ratio(self):
        """
        One guide call's cost in main-model calls.
        """
        if self._cost_ratio is None:
            self._cost_ratio = guide_cost_ratio(self.model, self.guide)
        return self._cost_ratio

    def call_cost(self, t):
        """
        The cost of one call per row of t, in plain calls of the main model (float64, t's shape; a scalar t is one
        row): the main model's cost, plus cost_ratio where the row is guided (its scheduled scale nonzero).
        """
        t = th.as_tensor(t)
        rows_t, index = self.cost_rows(t)
        cost = wrapped_call_cost(self.model, rows_t)
        if index is not None:
            cost[index] += self.cost_ratio
        return cost.reshape(t.shape)


def forward_flops(model):
    """
    The FLOPs of one forward pass of an ADM U-Net (UNetModel or SuperResModel) on one sample at its image size,
    counted by torch's FlopCounterMode (matrix products and convolutions, which are nearly all of a U-Net's work).
    """
    param = next(model.parameters())
    channels = model.in_channels // 2 if isinstance(model, SuperResModel) else model.in_channels
    x = th.zeros(1, channels, model.image_size, model.image_size, device=param.device)
    kwargs = {}
    if isinstance(model, SuperResModel):
        kwargs["low_res"] = x
    if getattr(model, "num_classes", None) is not None:
        kwargs["y"] = th.zeros(1, dtype=th.long, device=param.device)
    counter = FlopCounterMode(display=False)
    with th.no_grad(), counter:
        model(x, th.zeros(1, device=param.device), **kwargs)
    return counter.get_total_flops()


def guide_cost_ratio(model, guide):
    """
    The guide's forward FLOPs over the main model's (forward_flops), the cost of a guide call in main-model calls.
    """
    return forward_flops(guide) / forward_flops(model)
