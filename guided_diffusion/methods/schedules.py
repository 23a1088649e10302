"""
How a guidance's scale varies over sampling: one mechanism for every guided model (PAG and its perturbation
kinds, SAG, autoguidance).

The scale at a call is

    s_t = shape(s, step) * [sigma_lo < sigma_t <= sigma_hi]

and the guided model's t_range (--X_interval, original timesteps) masks it further. The shapes:

    constant   s
    linear     s * i / (N - 1)
    cosine     s * cos(pi/2 * (N - 1 - i) / (N - 1))
    adaptive   max(0, s - a * (1000 - t'))

i is the sampler's step index (N - 1 at the noisiest step, 0 at the last; N the number of steps sampled, after
respacing), t' the step's original timestep on a 0..1000 scale (t * 1000 / diffusion_steps).

- linear and cosine are the official PAG code's create_guidance_scale_schedule (np.linspace(g, 0, N) and
  cos(np.linspace(0, pi/2, N)) * g, reversed and indexed by the sampler's step index), which that code left
  disabled: applied to its --guide_scale g (eps_perturbed + g (eps - eps_perturbed)) they end on the perturbed
  model's prediction at the last step. Applied here to the paper's s they end unguided (s_0 = 0).
- adaptive is diffusers' pag_adaptive_scale: pag_scale - pag_adaptive_scale * (1000 - t), clamped at 0. Diffusers
  uses the scheduler's timestep t of a 1000-step model; t' puts other --diffusion_steps on the same scale.
- the sigma interval is Kynkaanniemi et al. (NeurIPS 2024, "Applying guidance in a limited interval"): guided
  where sigma_lo < sigma_t <= sigma_hi, sigma_t = sqrt((1 - alphabar_t) / alphabar_t) of the step's original
  timestep, from the original (not respaced) schedule.
"""

import math

import numpy as np
import torch as th

SCHEDULE_KINDS = ("constant", "linear", "cosine", "adaptive")


def model_timesteps(diffusion):
    """
    The timestep the model receives at each of the diffusion's steps (float64, by step index): the original
    timestep under respacing (SpacedDiffusion's _WrappedModel), rescaled to [0, 1000) with rescale_timesteps.
    """
    steps, total = original_timesteps(diffusion)
    steps = th.tensor(steps, dtype=th.float64)
    if diffusion.rescale_timesteps:
        steps = steps * (1000.0 / total)
    return steps


def original_timesteps(diffusion):
    """
    ([the original timestep of each step index], the number of original steps).
    """
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is None:
        return list(range(diffusion.num_timesteps)), diffusion.num_timesteps
    return [int(t) for t in timestep_map], diffusion.original_num_steps


def original_alphas_cumprod(diffusion):
    """
    alphabar of the original (un-respaced) process at every original timestep.
    """
    base = getattr(diffusion, "original_alphas_cumprod", None)
    return np.asarray(diffusion.alphas_cumprod if base is None else base, dtype=np.float64)


def step_sigmas(diffusion):
    """
    sigma_t = sqrt((1 - alphabar_t) / alphabar_t) at each step index, t the step's original timestep.
    """
    steps, _ = original_timesteps(diffusion)
    abar = original_alphas_cumprod(diffusion)[steps]
    return np.sqrt((1.0 - abar) / abar)


def step_indices(table, t, what="guidance"):
    """
    The step index of each model timestep t (a tensor), looked up in `table` (model_timesteps(diffusion)); a
    timestep that is not one of the diffusion's steps is a ValueError.
    """
    table = table.to(t.device)
    gap, index = (t.double().reshape(-1)[:, None] - table[None, :]).abs().min(dim=1)
    if bool((gap > 1e-3).any()):
        bad = t.reshape(-1)[gap > 1e-3][0].item()
        raise ValueError(
            f"{what}: the model was called with timestep {bad:g}, which is not a step of the diffusion the "
            "guidance was given; pass the diffusion the model is sampled with"
        )
    return index


def schedule_text(kind, sigma_interval, adaptive_a):
    """How a schedule reads in the log: its kind (with adaptive's a) and its sigma interval, or 'constant'."""
    parts = [f"adaptive a={adaptive_a:g}"] if kind == "adaptive" else [] if kind == "constant" else [kind]
    if sigma_interval is not None:
        parts.append(f"sigma in ({sigma_interval[0]:g}, {sigma_interval[1]:g}]")
    return ", ".join(parts) or "constant"


def number_pair(value, name):
    """(lo, hi) as floats from a pair of numbers; a ValueError naming `name` for anything else."""
    try:
        lo, hi = value
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {value!r}") from None


def check_sigma_interval(sigma_interval):
    """
    None, or a pair (lo, hi) of floats with 0 <= lo < hi (hi may be inf).
    """
    if sigma_interval is None:
        return None
    lo, hi = number_pair(sigma_interval, "sigma_interval")
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ValueError(f"sigma_interval must satisfy 0 <= lo < hi, got {sigma_interval!r}")
    return lo, hi


def check_adaptive_a(adaptive_a):
    """
    The adaptive schedule's a as a float: a finite number >= 0 (a number's text too).
    """
    try:
        value = float(adaptive_a)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"adaptive_a must be a finite number >= 0, got {adaptive_a!r}")
    return value


class ScaleSchedule:
    """
    A guidance scale's schedule (see the module docstring).

    :param kind: "constant", "linear", "cosine" or "adaptive".
    :param diffusion: the diffusion the model is sampled with (a SpacedDiffusion under respacing); needed by every
                      kind but constant, and by sigma_interval.
    :param sigma_interval: (lo, hi): guide only where lo < sigma_t <= hi; None: every step.
    :param adaptive_a: adaptive's a >= 0 (required by adaptive, refused by the other kinds).
    """

    def __init__(self, kind="constant", diffusion=None, sigma_interval=None, adaptive_a=None):
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {kind!r} is unknown; use one of {', '.join(SCHEDULE_KINDS)}")
        if (kind == "adaptive") != (adaptive_a is not None):
            raise ValueError("adaptive_a is required by the adaptive schedule and by no other")
        if adaptive_a is not None:
            adaptive_a = check_adaptive_a(adaptive_a)
        self.kind = kind
        self.sigma_interval = check_sigma_interval(sigma_interval)
        self.adaptive_a = adaptive_a
        self.constant = kind == "constant" and self.sigma_interval is None
        self.num_steps = None
        if self.constant:
            return
        if diffusion is None:
            raise ValueError(f"the {self.describe()} schedule needs the diffusion the model is sampled with")
        self.num_steps = diffusion.num_timesteps
        self._model_timesteps = model_timesteps(diffusion)
        steps, total = original_timesteps(diffusion)
        self._time_1000 = th.tensor(steps, dtype=th.float64) * (1000.0 / total)
        self._sigmas = th.from_numpy(step_sigmas(diffusion))

    def describe(self):
        return schedule_text(self.kind, self.sigma_interval, self.adaptive_a)

    def factors(self, index):
        """
        shape(1, step) * [sigma inside] at step indices `index` (float64) for every kind but adaptive, whose
        shape is not proportional to s.
        """
        n = self.num_steps
        i = index.double()
        if self.kind == "linear":
            shape = i / (n - 1) if n > 1 else th.ones_like(i)
        elif self.kind == "cosine":
            # cos(pi/2 (N-1-i)/(N-1)) written as sin(pi/2 i/(N-1)), its equal, which is exactly 0 at the last
            # step and exactly 1 at the first (float64's cos(pi/2) is 6e-17, not 0: a pass for nothing).
            shape = th.sin((math.pi / 2) * i / (n - 1)) if n > 1 else th.ones_like(i)
        else:
            shape = th.ones_like(i)
        return shape * self.sigma_mask(index)

    def sigma_mask(self, index):
        if self.sigma_interval is None:
            return th.ones(index.shape, dtype=th.float64, device=index.device)
        lo, hi = self.sigma_interval
        sigma = self._sigmas.to(index.device)[index]
        return ((sigma > lo) & (sigma <= hi)).double()

    def scales(self, scale, t, batch_size):
        """
        The scale of each row at model timesteps t (float64, shape [batch_size]); None for a constant schedule
        (every row's scale is `scale`).
        """
        if self.constant:
            return None
        t = th.as_tensor(t)
        if t.dim() == 0:
            t = t.expand(batch_size)
        index = step_indices(self._model_timesteps, t, "the guidance schedule")
        if self.kind == "adaptive":
            when = self._time_1000.to(index.device)[index]
            values = (scale - self.adaptive_a * (1000.0 - when)).clamp(min=0.0)
            return values * self.sigma_mask(index)
        return scale * self.factors(index)

    def step_scales(self, scale):
        """
        The scale at every step index (float64 numpy, index 0 = the last step), for logs, plots and tests.
        """
        if self.constant:
            raise ValueError("a constant schedule has no table of steps; its scale is the same at every step")
        t = self._model_timesteps
        return self.scales(scale, t, len(t)).numpy()
