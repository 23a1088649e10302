"""
Gaussian diffusion: forward noising, reverse sampling (ancestral and DDIM),
training losses and bits-per-dim evaluation.

Numerically this matches ADM (openai/guided-diffusion): every schedule is
computed in float64 numpy and only cast to float32 after indexing by
timestep, and random numbers are drawn in the same order, so a given seed
yields the same samples. Built on the formulation of Ho et al. (2020), with
the learned variances and cosine schedule of Nichol & Dhariwal (2021) and
DDIM sampling of Song et al. (2020).
"""

import enum
import math

import numpy as np
import torch as th

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import mean_flat
from .common.nonfinite import check_finite


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    Get a pre-defined beta schedule by name.

    "linear" is the schedule of Ho et al., stretched so that any number of
    steps spans the same noise levels as the original 1000 steps. "cosine" is
    the schedule of Nichol & Dhariwal. Both keep the limit of
    num_diffusion_timesteps -> infinity well defined.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        beta_start = scale * 0.0001
        beta_end = scale * 0.02
        return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
    elif schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    else:
        raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(t), t in [0, 1], into betas.

    :param num_diffusion_timesteps: the number of betas to produce.
    :param alpha_bar: maps t in [0, 1] to the cumulative product of (1 - beta)
                      up to that point of the diffusion.
    :param max_beta: the largest beta allowed; capping avoids the singularity
                     where alpha_bar reaches zero at t = 1.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


class ModelMeanType(enum.Enum):
    """
    Which quantity the model predicts.
    """

    PREVIOUS_X = enum.auto()  # the mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """
    How the reverse-process variance is obtained.

    LEARNED_RANGE lets the model interpolate (in log space) between
    FIXED_SMALL and FIXED_LARGE, which is far easier to learn than LEARNED.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE (plus the RESCALED_KL vb term for learned variances)
    RESCALED_MSE = enum.auto()  # MSE, with the vb term scaled as for RESCALED_KL
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the VLB scaled up to estimate the full bound

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


class GaussianDiffusion:
    """
    Utilities for training and sampling diffusion models.

    :param betas: a 1-D array of betas, one per diffusion step, from T down to
                  1 in reverse order of sampling.
    :param model_mean_type: a ModelMeanType: what the model outputs.
    :param model_var_type: a ModelVarType: how the variance is output.
    :param loss_type: a LossType: the training objective.
    :param rescale_timesteps: if True, pass the model floating-point
                              timesteps scaled so that they always span
                              [0, 1000), as in the original paper.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps=False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        # float64 throughout, for accuracy of the derived quantities.
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        assert len(betas.shape) == 1, "betas must be 1-D"
        assert (betas > 0).all() and (betas <= 1).all()

        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is zero at t = 0, so its log is taken with
        # the first entry replaced by the second.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of noiseless inputs.
        :param t: the number of diffusion steps (minus 1); 0 is one step.
        :return: a tuple (mean, variance, log_variance), all shaped like x_start.
        """
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """
        Diffuse the data by t steps, i.e. sample from q(x_t | x_0).

        :param x_start: the initial data batch.
        :param t: the number of diffusion steps (minus 1); 0 is one step.
        :param noise: if given, the Gaussian noise to use.
        :return: a noisy version of x_start.
        """
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The diffusion posterior q(x_{t-1} | x_t, x_0).

        :return: a tuple (mean, variance, log_variance_clipped).
        """
        assert x_start.shape == x_t.shape
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(
            self.posterior_log_variance_clipped, t, x_t.shape
        )
        assert (
            posterior_mean.shape[0]
            == posterior_variance.shape[0]
            == posterior_log_variance_clipped.shape[0]
            == x_start.shape[0]
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: a callable model(x, t, **model_kwargs) returning a
                      tensor of C channels, or 2C for learned variances.
        :param x: the [N x C x ...] tensor at time t.
        :param t: a 1-D tensor of timesteps.
        :param clip_denoised: if True, clip the x_0 prediction to [-1, 1].
        :param denoised_fn: if not None, applied to the x_0 prediction before
                            clipping and before it is used to compute the mean.
        :param model_kwargs: extra keyword arguments for the model, e.g. the
                             class labels "y".
        :return: a dict with keys "mean", "variance", "log_variance" and
                 "pred_xstart".
        """
        if model_kwargs is None:
            model_kwargs = {}

        B, C = x.shape[:2]
        assert t.shape == (B,)
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        return self.p_mean_variance_of(model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)

    def call_model(self, model, x, t, model_kwargs=None):
        """
        Call model(x, timesteps, **model_kwargs) with the timesteps p_mean_variance gives the model at the step
        indices t (rescaled with rescale_timesteps; the original timesteps under respacing), and return what it
        returns: e.g. the (plain, guided) pair of a GuidedModel's plain_and_guided.
        """
        return model(x, self._scale_timesteps(t), **(model_kwargs or {}))

    def p_mean_variance_of(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """
        p_mean_variance from a model output already computed at x (see call_model).
        """
        B, C = x.shape[:2]
        assert t.shape == (B,)
        if self.model_var_type in [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]:
            assert model_output.shape == (B, C * 2, *x.shape[2:])
            model_output, model_var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = th.exp(model_log_variance)
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                # The model outputs a value in [-1, 1]; map it to [0, 1].
                frac = (model_var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = th.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # Use betas, except at t = 0 where the posterior variance gives a
            # better decoder log-likelihood.
            large_variance = np.append(self.posterior_variance[1], self.betas[1:])
            model_variance = _extract_into_tensor(large_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(np.log(large_variance), t, x.shape)
        elif self.model_var_type == ModelVarType.FIXED_SMALL:
            model_variance = _extract_into_tensor(self.posterior_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(
                self.posterior_log_variance_clipped, t, x.shape
            )
        else:
            raise NotImplementedError(self.model_var_type)

        pred_xstart = self.pred_xstart(model_output, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            model_mean = model_output
        else:
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def pred_xstart(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """
        The prediction of x_0 that p_mean_variance makes from a model output at x (step indices t): from its
        first C channels (the output has C, or 2C with learned variances), through denoised_fn, then clipped to
        [-1, 1] if clip_denoised.
        """
        C = x.shape[1]
        if model_output.shape[1] != C and self.model_var_type in [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]:
            model_output = model_output[:, :C]
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            x_pred = self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output)
        elif self.model_mean_type == ModelMeanType.START_X:
            x_pred = model_output
        elif self.model_mean_type == ModelMeanType.EPSILON:
            x_pred = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        else:
            raise NotImplementedError(self.model_mean_type)
        if denoised_fn is not None:
            x_pred = denoised_fn(x_pred)
        if clip_denoised:
            return x_pred.clamp(-1, 1)
        return x_pred

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        assert x_t.shape == xprev.shape
        # Invert the posterior mean: xprev = coef1 * x_0 + coef2 * x_t.
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(
                self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape
            )
            * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Shift the mean of p(x_{t-1} | x_t) by variance * grad log p(y | x_t),
        the classifier guidance of Sohl-Dickstein et al. (2015).

        cond_fn(x, t, **model_kwargs) returns the gradient of the conditional
        log-probability with respect to x (already multiplied by any guidance
        scale).
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, self._scale_timesteps(t), **model_kwargs)
        new_mean = p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()
        return new_mean

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        Condition the model's score on cond_fn, as in Song et al. (2020):
        eps is shifted by -sqrt(1 - alpha_bar) * grad log p(y | x_t), and the
        x_0 prediction and mean are recomputed from it.

        Unlike condition_mean(), this works for deterministic (DDIM) sampling.
        Returns a new dict; p_mean_var is left unchanged.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)

        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **model_kwargs)

        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        noise_fn=None,
    ):
        """
        Sample x_{t-1} from the model at timestep t.

        Arguments as in p_mean_variance(); cond_fn, if given, is a gradient
        function used for classifier guidance through condition_mean();
        noise_fn, if given, replaces th.randn_like(x) (see p_sample_loop()).
        :return: a dict with keys "sample" and "pred_xstart".
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        # Drawn before cond_fn runs, so guidance does not change which noise
        # a seed produces.
        noise = th.randn_like(x) if noise_fn is None else noise_fn(x)
        nonzero_mask = _nonzero_mask(t, x)  # the last step adds no noise
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        noise_fn=None,
    ):
        """
        Generate samples with ancestral sampling.

        :param model: any callable model(x, t, **model_kwargs).
        :param shape: the shape of the samples, (N, C, H, W).
        :param noise: if given, the starting x_T (shaped like `shape`).
        :param clip_denoised: if True, clip x_0 predictions to [-1, 1].
        :param denoised_fn: if not None, applied to each x_0 prediction.
        :param cond_fn: if not None, a classifier-guidance gradient function.
        :param model_kwargs: extra keyword arguments for the model.
        :param device: where to create the samples; by default the device of
                       the model's parameters (or of `noise`, or the CPU).
        :param progress: if True, show a tqdm progress bar; a dict gives tqdm options (e.g. leave=False).
        :param noise_fn: if not None, noise_fn(x) returns the per-step noise
                         (a tensor like x) in place of th.randn_like(x), e.g.
                         to give every sample its own random stream. Called
                         once per step, at the point the default draws.
        :return: the final batch of samples (not differentiable).
        """
        final = None
        for sample in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            noise_fn=noise_fn,
        ):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        noise_fn=None,
    ):
        """
        Like p_sample_loop(), but yield the output of p_sample() at every
        timestep, from T - 1 down to 0. A step that gives NaN or Inf raises
        nonfinite.NonFiniteSampleError before it is yielded.
        """
        if device is None:
            device = _default_device(model, noise)
        assert isinstance(shape, (tuple, list))
        if noise is not None:
            img = noise
        else:
            img = th.randn(*shape, device=device)
        indices = _timestep_indices(self.num_timesteps, progress)

        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.p_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    cond_fn=cond_fn,
                    model_kwargs=model_kwargs,
                    noise_fn=noise_fn,
                )
                check_finite(out["sample"], self, i, model, cond_fn)
                yield out
                img = out["sample"]

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
        noise_fn=None,
    ):
        """
        Sample x_{t-1} from the model with DDIM (Song et al., eq. 12).

        Arguments as in p_sample(); eta scales the injected noise (0 gives the
        deterministic DDIM sampler, 1 matches the ancestral variance).
        """
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Re-derive eps from the (possibly clipped or guided) x_0 prediction,
        # whatever the model actually predicts.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        # Drawn even when eta == 0, to keep the random stream the same for
        # every eta.
        noise = th.randn_like(x) if noise_fn is None else noise_fn(x)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev)
            + th.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        nonzero_mask = _nonzero_mask(t, x)
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """
        Map x_t to x_{t+1} with the deterministic DDIM ODE run forwards.
        """
        assert eta == 0.0, "Reverse ODE only for deterministic path"
        out = self.p_mean_variance(
            model,
            x,
            t,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        eps = (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
            - out["pred_xstart"]
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x.shape)
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)

        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        noise_fn=None,
    ):
        """
        Generate samples with DDIM. Arguments as in p_sample_loop(), plus eta.
        """
        final = None
        for sample in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            noise_fn=noise_fn,
        ):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        noise_fn=None,
    ):
        """
        Like ddim_sample_loop(), but yield the output of ddim_sample() at
        every timestep; NaN or Inf raise as in p_sample_loop_progressive().
        """
        if device is None:
            device = _default_device(model, noise)
        assert isinstance(shape, (tuple, list))
        if noise is not None:
            img = noise
        else:
            img = th.randn(*shape, device=device)
        indices = _timestep_indices(self.num_timesteps, progress)

        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.ddim_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    cond_fn=cond_fn,
                    model_kwargs=model_kwargs,
                    eta=eta,
                    noise_fn=noise_fn,
                )
                check_finite(out["sample"], self, i, model, cond_fn)
                yield out
                img = out["sample"]

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational lower bound, in bits per dimension (for
        comparison with other papers, rather than nats).

        :return: a dict with "output", an [N] tensor of KLs (or the decoder
                 NLL where t == 0), and "pred_xstart".
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        assert decoder_nll.shape == x_start.shape
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)

        # L_0 is the decoder NLL; every later term is
        # KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
        output = th.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Training losses for a single timestep per example.

        :param model: the model to evaluate.
        :param x_start: the [N x C x ...] tensor of inputs.
        :param t: a batch of timestep indices.
        :param model_kwargs: extra keyword arguments for the model.
        :param noise: if given, the noise used to diffuse x_start.
        :return: a dict with key "loss" (shape [N]) and, depending on the
                 loss type, "mse" and "vb".
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}

        if self.loss_type == LossType.KL or self.loss_type == LossType.RESCALED_KL:
            terms["loss"] = self._vb_terms_bpd(
                model=model,
                x_start=x_start,
                x_t=x_t,
                t=t,
                clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type == LossType.MSE or self.loss_type == LossType.RESCALED_MSE:
            model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)

            if self.model_var_type in [ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE]:
                B, C = x_t.shape[:2]
                assert model_output.shape == (B, C * 2, *x_t.shape[2:])
                model_output, model_var_values = th.split(model_output, C, dim=1)
                # The vb term trains only the variance: with the mean
                # detached, the MSE term alone shapes the mean.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # MSE is an average over terms while the bound is a sum;
                    # the factor 1000 keeps the vb weight independent of the
                    # number of steps.
                    terms["vb"] *= self.num_timesteps / 1000.0

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.EPSILON:
                target = noise
            else:
                raise NotImplementedError(self.model_mean_type)
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            if "vb" in terms:
                terms["loss"] = terms["mse"] + terms["vb"]
            else:
                terms["loss"] = terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)

        return terms

    def _prior_bpd(self, x_start):
        """
        KL(q(x_T | x_0) || N(0, I)) in bits per dimension. It does not depend
        on the model: it only measures how well the schedule destroys x_0.

        :return: an [N] tensor.
        """
        batch_size = x_start.shape[0]
        t = th.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """
        The full variational lower bound in bits per dimension, plus related
        per-timestep quantities.

        Draws one randn_like(x_start) per timestep, from T - 1 down to 0.

        :return: a dict with
                 - "total_bpd": [N], the total bound;
                 - "prior_bpd": [N], the prior term;
                 - "vb": [N x T], the terms of the bound;
                 - "xstart_mse": [N x T], MSE of the x_0 predictions;
                 - "mse": [N x T], MSE of the implied eps predictions.
        """
        device = x_start.device
        batch_size = x_start.shape[0]

        vb = []
        xstart_mse = []
        mse = []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)

        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Index a 1-D numpy array by a batch of timesteps and broadcast the result.

    The lookup happens in float64 and only the selected values are cast to
    float32, which is what keeps results equal to ADM's.

    :param arr: the 1-D numpy array.
    :param timesteps: a tensor of indices into arr.
    :param broadcast_shape: a shape [N x ...] whose first dimension is the
                            batch size.
    :return: a float32 tensor of shape broadcast_shape.
    """
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


def _nonzero_mask(t, x):
    # 1 where t != 0, shaped to broadcast against x.
    return (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))


def _timestep_indices(num_timesteps, progress):
    indices = list(range(num_timesteps))[::-1]
    if progress:
        # Imported lazily so that sampling without a progress bar never needs tqdm.
        from tqdm.auto import tqdm

        options = dict(desc="diffusion steps", unit="step", dynamic_ncols=True)
        if isinstance(progress, dict):
            options.update(progress)
        indices = tqdm(indices, **options)
    return indices


def _default_device(model, noise):
    """
    The device to sample on when none is given: the model's parameters (as in
    ADM), else the starting noise, else the CPU. Sampling loops accept any
    callable, e.g. a guidance wrapper without parameters of its own.
    """
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        try:
            return next(iter(parameters())).device
        except StopIteration:
            pass
    if noise is not None:
        return noise.device
    return th.device("cpu")
