"""
Sampling with fewer steps than the diffusion was trained with, by skipping
timesteps of the base process (Nichol & Dhariwal, 2021, section 4).
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which timesteps of the base process to keep.

    The process is cut into equal sections (the first ones one step longer
    when the division is not exact) and each section is strided evenly, e.g.
    num_timesteps=300 with section_counts=[10, 15, 20] keeps 10 of steps
    0-99, 15 of steps 100-199 and 20 of steps 200-299.

    :param num_timesteps: the number of steps of the original process.
    :param section_counts: a list of counts per section, or a string of
                           comma-separated counts. The special string "ddimN"
                           instead keeps every k-th step from 0 for the
                           integer stride k that gives exactly N steps, as in
                           the DDIM paper.
    :return: the set of kept timesteps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot create exactly {desired_count} steps with an integer stride"
            )
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        # Accumulating a float and rounding (round half to even) reproduces
        # ADM's choice of steps exactly.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion process that keeps only some steps of a base process.

    Betas are recomputed so that alphas_cumprod at the kept steps equal the
    base process's. Models and cond_fns are called with the original
    timesteps, so a model trained on the base process works unchanged.

    :param use_timesteps: a collection of timesteps of the base process to
                          keep (e.g. the output of space_timesteps()).
    :param kwargs: the keyword arguments of the base GaussianDiffusion.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])

        base_diffusion = GaussianDiffusion(**kwargs)
        # The base process's alphabar at every original timestep (schedules.py reads sigma_t from it).
        self.original_alphas_cumprod = base_diffusion.alphas_cumprod
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def call_model(self, model, *args, **kwargs):
        return super().call_model(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # _WrappedModel maps and rescales timesteps itself.
        return t


class _WrappedModel:
    """
    Calls a model (or cond_fn) with original timesteps in place of spaced
    indices, rescaled to [0, 1000) when rescale_timesteps is set.
    """

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
