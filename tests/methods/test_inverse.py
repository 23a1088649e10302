"""
Inverse problems (guided_diffusion/methods/inverse.py): the operators against independent re-implementations of the DPS
reference code's operators, dps_sample_loop against an independent re-implementation of DPS's sampling loop
(draw for draw), batches against their images one by one, PAG + DPS against its rule, the DPS FFHQ checkpoint
layout against our create_model, and the error messages.
"""

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from guided_diffusion.methods import inverse
from guided_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from guided_diffusion.methods.inverse import create_operator, dps_sample_loop
from guided_diffusion.methods.pag import PAGGuidedModel, perturb_attention
from guided_diffusion.common.random_streams import PerSampleNoise, sample_generator
from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.methods.sag import SAGGuidedModel
from guided_diffusion.script_util import create_model
from guided_diffusion.methods.two_pass import pag_two_pass
from guided_diffusion.unet import UNetModel

from conftest import flags, load_script, randomize, randomize_zero_params


pytestmark = pytest.mark.usefixtures("one_thread")


def random_images(n=2, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


# --- independent versions of DPS's operators ---------------------------------------------------------------------


def dps_blur(x, kernel):
    # DPS's Blurkernel: ReflectionPad2d(k // 2) then a grouped 3-channel Conv2d whose weights are the kernel.
    k = kernel.shape[0]
    conv = torch.nn.Conv2d(3, 3, k, stride=1, padding=0, bias=False, groups=3)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    return torch.nn.Sequential(torch.nn.ReflectionPad2d(k // 2), conv)(x)


def dps_gaussian_kernel(k, sigma):
    # gaussian_filter of a centred delta = the outer product of the normalised, 4-sigma-truncated 1-D Gaussian.
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.zeros((k, k))
    c = k // 2
    out[c - radius : c + radius + 1, c - radius : c + radius + 1] = np.outer(taps, taps)
    return torch.from_numpy(out).float()


def dps_resize_down(x, factor):
    """
    Shocher's Resizer as DPS runs it (antialiased cubic, scale 1 / factor), one output pixel at a time: gather the
    input pixels each output pixel sees (mirrored at the borders) and sum them with normalised weights.
    """

    def cubic(d):
        a = abs(d)
        if a <= 1:
            return 1.5 * a**3 - 2.5 * a**2 + 1
        if a <= 2:
            return -0.5 * a**3 + 2.5 * a**2 - 4 * a + 2
        return 0.0

    def along(n_in):
        s = 1.0 / factor
        n_out = n_in // factor
        width = 4.0 / s
        taps = int(math.ceil(width) + 2)
        fov, weights = [], []
        for o in range(1, n_out + 1):
            centre = o / s + 0.5 * (1 - 1 / s)
            left = math.floor(centre - width / 2)
            idx = [left + j - 1 for j in range(taps)]
            w = [s * cubic(s * (centre - i - 1)) for i in idx]
            total = sum(w)
            w = [v / total for v in w]
            mirrored = []
            for i in idx:
                i %= 2 * n_in
                mirrored.append(i if i < n_in else 2 * n_in - 1 - i)
            fov.append(mirrored)
            weights.append(w)
        return torch.tensor(fov), torch.tensor(weights, dtype=torch.float32)

    for dim in (2, 3):
        fov, w = along(x.shape[dim])
        x = x.transpose(dim, 0)
        # x[fov.T]: taps x out x (rest), weighted and summed over the taps.
        w = w.t().reshape(w.shape[1], w.shape[0], *([1] * (x.dim() - 1)))
        x = (x[fov.t()] * w).sum(dim=0)
        x = x.transpose(dim, 0)
    return x


def dps_box_mask(seed, image_size, len_range, margin=(16, 16)):
    # mask_generator("box") on numpy's global RNG, seeded.
    np.random.seed(seed)
    lo, hi = len_range
    h = np.random.randint(lo, hi)
    w = np.random.randint(lo, hi)
    t = np.random.randint(margin[0], image_size - margin[0] - h)
    l = np.random.randint(margin[1], image_size - margin[1] - w)
    mask = torch.ones(1, 3, image_size, image_size)
    mask[..., t : t + h, l : l + w] = 0
    return mask[:, 0, :, :].unsqueeze(dim=0)


def dps_random_mask(seed, image_size, prob_range):
    np.random.seed(seed)
    total = image_size**2
    prob = np.random.uniform(*prob_range)
    vec = torch.ones(1, total)
    vec[:, np.random.choice(total, int(total * prob), replace=False)] = 0
    mask = torch.ones(1, 3, image_size, image_size)
    mask[:, ...] = vec.view(1, image_size, image_size).repeat(3, 1, 1)
    return mask[:, 0, :, :].unsqueeze(dim=0)


# --- operators ----------------------------------------------------------------------------------------------------


def test_gaussian_kernel_is_dps_kernel():
    for k, sigma in [(61, 3.0), (9, 1.0), (7, 0.5)]:
        ours = inverse.gaussian_kernel(k, sigma)
        assert ours.dtype == torch.float32 and ours.shape == (k, k)
        torch.testing.assert_close(ours, dps_gaussian_kernel(k, sigma), rtol=0, atol=1e-7)


def test_gaussian_blur_equals_dps():
    x = random_images(2, 64)
    op = create_operator("gaussian_blur", kernel_size=61, intensity=3.0)
    torch.testing.assert_close(op.forward(x), dps_blur(x, dps_gaussian_kernel(61, 3.0)), rtol=0, atol=1e-5)
    assert torch.equal(op.transpose(x), x)  # DPS's blur "transpose" is the identity


def test_motion_blur_with_given_kernel_equals_dps():
    gen = torch.Generator().manual_seed(3)
    kernel = torch.rand(9, 9, generator=gen) ** 4  # asymmetric, so a flipped convolution would show
    kernel /= kernel.sum()
    x = random_images(2, 32)
    op = create_operator("motion_blur", kernel_size=9, intensity=0.5, kernel=kernel)
    torch.testing.assert_close(op.forward(x), dps_blur(x, kernel), rtol=0, atol=1e-6)


def test_motion_kernel_from_seed():
    a = create_operator("motion_blur", kernel_size=61, intensity=0.5, seed=7).kernel
    b = create_operator("motion_blur", kernel_size=61, intensity=0.5, seed=7).kernel
    c = create_operator("motion_blur", kernel_size=61, intensity=0.5, seed=8).kernel
    assert a.shape == (61, 61) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and abs(float(a.sum()) - 1) < 1e-5
    # DPS's operator keeps the second kernel drawn from the global RNG (its Blurkernel's first one is replaced).
    rng = np.random.RandomState(7)
    first = inverse.motion_kernel(61, 0.5, rng)
    assert torch.equal(inverse.motion_kernel(61, 0.5, rng), a) and not torch.equal(first, a)
    # A RandomState and numpy's seeded global RNG give the same kernel (DPS draws from the global one).
    np.random.seed(7)
    assert torch.equal(inverse.motion_kernel(61, 0.5, np.random.mtrand._rand), first)
    # The path is a blurred line, not a point: many pixels carry weight, and the mass is centred.
    assert int((a > 1e-4).sum()) > 20
    ys, xs = torch.meshgrid(torch.arange(61.0), torch.arange(61.0), indexing="ij")
    assert abs(float((a * ys).sum()) - 30) < 8 and abs(float((a * xs).sum()) - 30) < 8


@pytest.mark.parametrize("size,factor", [(256, 4), (32, 4), (24, 2)])
def test_super_resolution_equals_dps_resizer(size, factor):
    x = random_images(1 if size == 256 else 2, size)
    op = create_operator("super_resolution", in_shape=(1, 3, size, size), scale_factor=factor)
    y = op.forward(x)
    assert y.shape == (x.shape[0], 3, size // factor, size // factor)
    torch.testing.assert_close(y, dps_resize_down(x, factor), rtol=0, atol=2e-6)
    # A constant image stays constant (the weights of every output pixel sum to one).
    torch.testing.assert_close(op.forward(torch.full_like(x, 0.3)), torch.full_like(y, 0.3), rtol=0, atol=1e-6)
    # transpose is DPS's nearest-neighbour F.interpolate.
    up = op.transpose(y)
    assert torch.equal(up, y.repeat_interleave(factor, 2).repeat_interleave(factor, 3))


@pytest.mark.parametrize("seed", [0, 5])
def test_masks_equal_dps_mask_generator(seed):
    box = inverse.box_mask(256, (128, 129), (16, 16), np.random.RandomState(seed))
    assert torch.equal(box, dps_box_mask(seed, 256, (128, 129)))
    assert int((box == 0).sum()) == 128 * 128
    box = inverse.box_mask(64, (10, 30), (4, 4), np.random.RandomState(seed))
    assert torch.equal(box, dps_box_mask(seed, 64, (10, 30), (4, 4)))
    rnd = inverse.random_mask(64, (0.3, 0.7), np.random.RandomState(seed))
    assert torch.equal(rnd, dps_random_mask(seed, 64, (0.3, 0.7)))
    extreme = inverse.make_mask("extreme", 64, mask_len_range=(10, 30), margin=(4, 4), rng=seed)
    assert torch.equal(extreme, 1 - box)


def test_inpainting_forward_is_masking():
    x = random_images(2, 64)
    op = create_operator("inpainting", mask_type="random", mask_prob_range=(0.3, 0.7), image_size=64)
    mask = op.new_mask(1)
    op.set_mask(mask)
    assert torch.equal(op.forward(x), x * dps_random_mask(1, 64, (0.3, 0.7)))
    # One mask per image.
    masks = torch.cat([op.new_mask(1), op.new_mask(2)])
    op.set_mask(masks)
    y = op.forward(x)
    assert torch.equal(y[1], x[1] * masks[1])
    # A fixed H x W mask.
    fixed = create_operator("inpainting", mask=mask[0, 0])
    assert torch.equal(fixed.forward(x), x * mask)


def test_measurement_noise_per_image_stream():
    y = torch.zeros(3, 3, 8, 8)
    gens = [sample_generator(0, i) for i in range(3)]
    noisy = inverse.add_measurement_noise(y, 0.05, gens)
    alone = inverse.add_measurement_noise(y[1:2], 0.05, [sample_generator(0, 1)])
    assert torch.equal(noisy[1:2], alone)
    torch.manual_seed(4)
    a = inverse.add_measurement_noise(y, 0.05)
    torch.manual_seed(4)
    assert torch.equal(a, y + torch.randn_like(y) * 0.05)


# --- errors -------------------------------------------------------------------------------------------------------


def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown inverse-problem task 'deblur'.*gaussian_blur, motion_blur"):
        create_operator("deblur")
    with pytest.raises(ValueError, match="unknown parameter.*sigma.*kernel_size, intensity"):
        create_operator("gaussian_blur", kernel_size=61, sigma=3.0)
    with pytest.raises(ValueError, match="scale_factor 3 does not divide the image size 256 x 256"):
        create_operator("super_resolution", in_shape=(1, 3, 256, 256), scale_factor=3)
    op = create_operator("inpainting", mask=torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 32, 32\) does not fit images of shape \(1, 3, 64, 64\)"):
        op.forward(random_images(1, 64))
    with pytest.raises(ValueError, match="only 0 \\(missing\\) and 1"):
        create_operator("inpainting", mask=torch.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="unknown mask_type 'circle'"):
        create_operator("inpainting", mask_type="circle")
    with pytest.raises(ValueError, match="needs mask= .* or mask_type="):
        create_operator("inpainting")
    sr = create_operator("super_resolution", in_shape=32, scale_factor=4)
    with pytest.raises(ValueError, match=r"images are \(64, 64\), the operator was made for in_shape 32 x 32"):
        sr.forward(random_images(1, 64))
    with pytest.raises(ValueError, match="motion blur intensity must be a number in \\[0, 1\\]"):
        create_operator("motion_blur", kernel_size=61, intensity=3.0)
    with pytest.raises(ValueError, match="kernel_size 9 is too small for the trajectory construction"):
        create_operator("motion_blur", kernel_size=9, intensity=0.5)
    with pytest.raises(ValueError, match="kernel_size 61 needs images larger than 30 pixels"):
        create_operator("gaussian_blur", kernel_size=61, intensity=3.0).forward(random_images(1, 16))


# --- DPS sampling -------------------------------------------------------------------------------------------------

KEPT = [0, 150, 300, 450, 600, 800, 999]  # a respaced 1000-step linear schedule


def tiny_model(seed=0):
    model = UNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True,
        resblock_updown=True,
    )
    return randomize(model, seed)


def tiny_diffusion():
    return SpacedDiffusion(
        use_timesteps=KEPT,
        betas=get_named_beta_schedule("linear", 1000),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE,
        loss_type=LossType.MSE,
    )


class ReferenceDPS:
    """
    DPS's DDPM + "ps" loop at batch size 1, written from its gaussian_diffusion.py, posterior_mean_variance.py and
    condition_methods.py (learned-range variance, epsilon prediction, clipped x0, one norm, in-place update).
    """

    def __init__(self, kept):
        base = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
        betas, last = [], 1.0
        for i in kept:
            betas.append(1 - base[i] / last)
            last = base[i]
        b = np.array(betas)
        acp = np.cumprod(1 - b)
        prev = np.append(1.0, acp[:-1])
        post_var = b * (1 - prev) / (1 - acp)
        self.kept = kept
        self.recip = np.sqrt(1 / acp)
        self.recipm1 = np.sqrt(1 / acp - 1)
        self.c1 = b * np.sqrt(prev) / (1 - acp)
        self.c2 = (1 - prev) * np.sqrt(1 - b) / (1 - acp)
        self.min_log = np.log(np.append(post_var[1], post_var[1:]))
        self.max_log = np.log(b)

    @staticmethod
    def at(arr, time, target):
        v = torch.from_numpy(arr)[time].float()
        while v.ndim < target.ndim:
            v = v.unsqueeze(-1)
        return v.expand_as(target)

    def clipped_x0(self, img, time, eps):
        return (self.at(self.recip, time, img) * img - self.at(self.recipm1, time, img) * eps).clamp(-1, 1)

    def eps_and_var(self, model, x, i):
        out = model(x, torch.tensor([self.kept[i]]))
        return torch.split(out, 3, dim=1)

    def run(self, model, x_start, y, forward, scale, x0_model=None):
        img = x_start
        for i in reversed(range(len(self.kept))):
            time = torch.tensor([i])
            img = img.requires_grad_()
            eps, var = self.eps_and_var(model, img, i)
            x0 = (self.at(self.recip, time, img) * img - self.at(self.recipm1, time, img) * eps).clamp(-1, 1)
            mean = self.at(self.c1, time, x0) * x0 + self.at(self.c2, time, img) * img
            frac = (var + 1.0) / 2.0
            log_var = frac * self.at(self.max_log, time, var) + (1 - frac) * self.at(self.min_log, time, var)
            sample = mean
            noise = torch.randn_like(img)
            if i != 0:
                sample += torch.exp(0.5 * log_var) * noise
            torch.randn_like(y)  # q_sample(measurement, t)
            if x0_model is not None:
                x0 = x0_model(img, i, time)
            norm = torch.linalg.norm(y - forward(x0))
            grad = torch.autograd.grad(outputs=norm, inputs=img)[0]
            sample -= grad * scale
            img = sample.detach_()
        return img


def make_operator(name):
    if name == "gaussian_blur":
        return create_operator("gaussian_blur", kernel_size=5, intensity=1.0)
    if name == "super_resolution":
        return create_operator("super_resolution", in_shape=(1, 3, 16, 16), scale_factor=2)
    op = create_operator("inpainting", mask_type="box", mask_len_range=(4, 9), image_size=16, margin=(2, 2))
    return op.set_mask(op.new_mask(0))


@pytest.mark.parametrize("task", ["gaussian_blur", "super_resolution", "inpainting"])
def test_dps_loop_equals_reference_draw_for_draw(task):
    model, diffusion, op = tiny_model(), tiny_diffusion(), make_operator(task)
    x = random_images(1, 16, seed=1)
    torch.manual_seed(0)
    y = inverse.add_measurement_noise(op.forward(x), 0.05)
    x_T = torch.randn(1, 3, 16, 16)
    state = torch.get_rng_state()
    ours = dps_sample_loop(diffusion, model, x_T.clone(), y, op, scale=0.5)
    after_ours = torch.get_rng_state()
    torch.set_rng_state(state)
    ref = ReferenceDPS(KEPT).run(model, x_T.clone(), y, op.forward, 0.5)
    assert torch.equal(after_ours, torch.get_rng_state())  # the same number of draws, in the same order
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # The measurement gradient matters: without it the samples differ.
    torch.set_rng_state(state)
    free = dps_sample_loop(diffusion, model, x_T.clone(), y, op, scale=0.0)
    assert (free - ours).abs().max() > 1e-3


def test_batch_equals_images_one_by_one():
    model, diffusion = tiny_model(), tiny_diffusion()
    op = create_operator("inpainting", mask_type="random", mask_prob_range=(0.3, 0.7), image_size=16)
    masks = [op.new_mask(i) for i in range(3)]
    x = random_images(3, 16, seed=2)
    gens = [sample_generator(11, i) for i in range(3)]
    op.set_mask(torch.cat(masks))
    y = inverse.add_measurement_noise(op.forward(x), 0.05, gens)
    x_T = PerSampleNoise(gens).draw((3, 3, 16, 16), "cpu")
    batch = dps_sample_loop(diffusion, model, x_T, y, op, 1.0, noise_fn=PerSampleNoise(gens))
    for i in range(3):
        gen = [sample_generator(11, i)]
        one = create_operator("inpainting", mask=masks[i])
        y_i = inverse.add_measurement_noise(one.forward(x[i : i + 1]), 0.05, gen)
        torch.testing.assert_close(y_i, y[i : i + 1], rtol=0, atol=0)
        x_T_i = PerSampleNoise(gen).draw((1, 3, 16, 16), "cpu")
        alone = dps_sample_loop(diffusion, model, x_T_i, y_i, one, 1.0, noise_fn=PerSampleNoise(gen))
        torch.testing.assert_close(alone, batch[i : i + 1], rtol=0, atol=1e-5)


class PAGRule:
    """
    PAG + DPS as specified: the ancestral step from eps + s (eps - eps_perturbed), the measurement gradient through
    the clipped x0 of the unperturbed eps (or of the guided eps, for gradient_through="guided").
    """

    def __init__(self, model, scale, layers):
        self.model, self.scale, self.layers = model, scale, layers
        self.plain = None

    def __call__(self, x, t):
        out = self.model(x, t)
        with torch.no_grad(), perturb_attention(self.model, self.layers):
            perturbed = self.model(x, t)
        self.plain = out
        eps = out[:, :3]
        return torch.cat([eps + self.scale * (eps - perturbed[:, :3]), out[:, 3:]], dim=1)


def deblur_problem():
    """
    The tiny model, its diffusion, a Gaussian-blur operator, a noisy measurement of one image, x_T and the
    reference loop.
    """
    model, diffusion, op = tiny_model(3), tiny_diffusion(), make_operator("gaussian_blur")
    x = random_images(1, 16, seed=4)
    torch.manual_seed(1)
    y = inverse.add_measurement_noise(op.forward(x), 0.05)
    x_T = torch.randn(1, 3, 16, 16)
    return model, diffusion, op, y, x_T, ReferenceDPS(KEPT)


def assert_dps_follows(diffusion, guided, x_T, y, op, ref, rule, plain_x0, guided_rule):
    """
    DPS with a guided model equals the reference loop stepping with rule(x, t) and taking the gradient through
    plain_x0; with gradient_through="guided" it equals the reference loop over guided_rule (the gradient through
    that output's own x0); the two differ. Returns the RNG state the runs started from.
    """
    state = torch.get_rng_state()
    ours = dps_sample_loop(diffusion, guided, x_T.clone(), y, op, 0.5)
    torch.set_rng_state(state)
    want = ref.run(rule, x_T.clone(), y, op.forward, 0.5, x0_model=plain_x0)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    torch.set_rng_state(state)
    ours_guided = dps_sample_loop(diffusion, guided, x_T.clone(), y, op, 0.5, gradient_through="guided")
    torch.set_rng_state(state)
    want_guided = ref.run(guided_rule, x_T.clone(), y, op.forward, 0.5)
    torch.testing.assert_close(ours_guided, want_guided, rtol=0, atol=1e-5)
    assert (ours_guided - ours).abs().max() > 1e-4
    return state


def test_pag_dps_follows_the_rule():
    model, diffusion, op, y, x_T, ref = deblur_problem()
    rule = PAGRule(model, 2.0, ["middle_block.1"])

    def plain_x0(img, i, time):
        return ref.clipped_x0(img, time, rule.plain[:, :3])

    guided = PAGGuidedModel(model, 2.0, "middle")
    # The ablation's reference: the gradient through the guided x0 (the reference's own x0, from the guided eps).
    two_pass = lambda a, b: pag_two_pass(model, a, b, 2.0, ["middle_block.1"])  # noqa: E731
    state = assert_dps_follows(diffusion, guided, x_T, y, op, ref, rule, plain_x0, two_pass)

    # PAG scale 0 is plain DPS.
    torch.set_rng_state(state)
    off = dps_sample_loop(diffusion, PAGGuidedModel(model, 0.0, "middle"), x_T.clone(), y, op, 0.5)
    torch.set_rng_state(state)
    torch.testing.assert_close(off, dps_sample_loop(diffusion, model, x_T.clone(), y, op, 0.5), rtol=0, atol=0)


def test_pag_perturbed_branch_has_no_autograd():
    model = tiny_model()
    guided = PAGGuidedModel(model, 2.0, "middle")
    x = random_images(1, 16).requires_grad_(True)
    t = torch.tensor([500])
    plain, out = guided.plain_and_guided(x, t)
    torch.testing.assert_close(out, guided(x, t), rtol=0, atol=1e-5)
    # d(guided eps)/dx through autograd is (1 + s) d(eps)/dx: the perturbed term is a constant to autograd.
    g_guided = torch.autograd.grad(out[:, :3].sum(), x, retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain[:, :3].sum(), x)[0]
    torch.testing.assert_close(g_guided, 3.0 * g_plain, rtol=1e-5, atol=1e-6)


def test_plain_and_guided_draws_a_random_perturbation_as_the_guided_call_does():
    # plain_and_guided runs the perturbed pass first; the plain pass draws nothing, so a seeded call gives the
    # two-pass guided output of the same seed.
    guided = PAGGuidedModel(tiny_model(), 2.0, "middle", kind="mask", drop_rate=0.5, batched=False)
    x, t = random_images(2, 16), torch.tensor([500, 300])
    torch.manual_seed(3)
    expected = guided(x, t)
    torch.manual_seed(3)
    plain, out = guided.plain_and_guided(x, t)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(plain, guided.model(x, t), rtol=0, atol=0)
    torch.manual_seed(4)
    assert (guided.plain_and_guided(x, t)[1] - out).abs().max() > 1e-4  # the mask is drawn, not fixed


def test_sag_dps_takes_the_gradient_through_the_plain_pass():
    # Every guided model composes with DPS the same way: the ancestral step from the guided output, the
    # measurement gradient through the x0 of the plain pass (for SAG: the undegraded one), or with
    # gradient_through="guided" through the guided x0 (both SAG passes and the degraded image).
    model, diffusion, op, y, x_T, ref = deblur_problem()
    sag = SAGGuidedModel(model, diffusion, 1.5, "middle", blur_sigma=3.0)
    plain = {}

    def rule(img, t):
        plain["eps"] = model(img, t)[:, :3]
        return sag(img, t)

    def plain_x0(img, i, time):
        return ref.clipped_x0(img, time, plain["eps"])

    assert_dps_follows(diffusion, sag, x_T, y, op, ref, rule, plain_x0, sag)


def test_sag_degraded_pass_has_no_autograd():
    model = tiny_model()
    sag = SAGGuidedModel(model, tiny_diffusion(), 2.0, "middle", blur_sigma=3.0)
    x = random_images(1, 16).requires_grad_(True)
    t = torch.tensor([600])
    plain, out = sag.plain_and_guided(x, t)
    torch.testing.assert_close(out, sag(x, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, model(x, t), rtol=0, atol=0)
    # guided eps = eps_bar + (1 + s) (eps - eps_bar) with eps_bar a constant to autograd: (1 + s) d(eps)/dx.
    g_guided = torch.autograd.grad(out[:, :3].sum(), x, retain_graph=True)[0]
    g_plain = torch.autograd.grad(plain[:, :3].sum(), x)[0]
    torch.testing.assert_close(g_guided, 3.0 * g_plain, rtol=1e-5, atol=1e-6)


def test_dps_argument_errors():
    model, diffusion, op = tiny_model(), tiny_diffusion(), make_operator("super_resolution")
    x_T = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"measurement has shape \(1, 3, 16, 16\), but super_resolution maps"):
        dps_sample_loop(diffusion, model, x_T, torch.zeros(1, 3, 16, 16), op, 1.0)
    with pytest.raises(ValueError, match="gradient_through must be one of plain, guided"):
        dps_sample_loop(diffusion, model, x_T, torch.zeros(1, 3, 8, 8), op, 1.0, gradient_through="both")
    with pytest.raises(ValueError, match="one row per image"):
        dps_sample_loop(diffusion, model, x_T, torch.zeros(2, 3, 8, 8), op, 1.0)


# --- the DPS FFHQ checkpoint layout --------------------------------------------------------------------------------

# DPS's configs/model_config.yaml (without model_path).
DPS_FFHQ_MODEL_CONFIG = dict(
    image_size=256, num_channels=128, num_res_blocks=1, channel_mult="", learn_sigma=True, class_cond=False,
    use_checkpoint=False, attention_resolutions="16", num_heads=4, num_head_channels=64, num_heads_upsample=-1,
    use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False, use_new_attention_order=False,
)


def adm_state_dict_shapes(num_channels, num_res_blocks, channel_mult, attention_ds, out_channels):
    """
    The state-dict keys and shapes of ADM's UNetModel (scale-shift norm, resblock up/down, no class labels),
    enumerated from its construction rules.
    """
    sd = {}
    emb = 4 * num_channels

    def res(p, cin, cout):
        sd[f"{p}.in_layers.0.weight"] = [cin]
        sd[f"{p}.in_layers.0.bias"] = [cin]
        sd[f"{p}.in_layers.2.weight"] = [cout, cin, 3, 3]
        sd[f"{p}.in_layers.2.bias"] = [cout]
        sd[f"{p}.emb_layers.1.weight"] = [2 * cout, emb]
        sd[f"{p}.emb_layers.1.bias"] = [2 * cout]
        sd[f"{p}.out_layers.0.weight"] = [cout]
        sd[f"{p}.out_layers.0.bias"] = [cout]
        sd[f"{p}.out_layers.3.weight"] = [cout, cout, 3, 3]
        sd[f"{p}.out_layers.3.bias"] = [cout]
        if cin != cout:
            sd[f"{p}.skip_connection.weight"] = [cout, cin, 1, 1]
            sd[f"{p}.skip_connection.bias"] = [cout]

    def attn(p, c):
        sd[f"{p}.norm.weight"] = [c]
        sd[f"{p}.norm.bias"] = [c]
        sd[f"{p}.qkv.weight"] = [3 * c, c, 1]
        sd[f"{p}.qkv.bias"] = [3 * c]
        sd[f"{p}.proj_out.weight"] = [c, c, 1]
        sd[f"{p}.proj_out.bias"] = [c]

    sd["time_embed.0.weight"] = [emb, num_channels]
    sd["time_embed.0.bias"] = [emb]
    sd["time_embed.2.weight"] = [emb, emb]
    sd["time_embed.2.bias"] = [emb]
    sd["input_blocks.0.0.weight"] = [num_channels, 3, 3, 3]
    sd["input_blocks.0.0.bias"] = [num_channels]
    skips, ch, ds, idx = [num_channels], num_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            res(f"input_blocks.{idx}.0", ch, mult * num_channels)
            ch = mult * num_channels
            if ds in attention_ds:
                attn(f"input_blocks.{idx}.1", ch)
            skips.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            res(f"input_blocks.{idx}.0", ch, ch)
            skips.append(ch)
            ds *= 2
            idx += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            res(f"output_blocks.{idx}.0", ch + skips.pop(), mult * num_channels)
            ch = mult * num_channels
            sub = 1
            if ds in attention_ds:
                attn(f"output_blocks.{idx}.1", ch)
                sub = 2
            if level and i == num_res_blocks:
                res(f"output_blocks.{idx}.{sub}", ch, ch)
                ds //= 2
            idx += 1
    sd["out.0.weight"] = [ch]
    sd["out.0.bias"] = [ch]
    sd["out.2.weight"] = [out_channels, num_channels, 3, 3]
    sd["out.2.bias"] = [out_channels]
    return sd


def test_enumeration_matches_a_released_adm_checkpoint():
    # The enumeration above reproduces a released ADM layout (the shared reference specs), so it can stand in for
    # DPS's ffhq_10m.pt, which uses the same U-Net code.
    import json

    from conftest import reference_file

    with open(reference_file("state_dict_specs.json")) as f:
        spec = json.load(f)["256x256_diffusion_uncond"]
    got = adm_state_dict_shapes(256, 2, (1, 1, 2, 2, 4, 4), (8, 16, 32), 6)
    assert list(got.items()) == [(k, list(v)) for k, v in spec["state_dict"].items()]


def test_dps_ffhq_state_dict_loads_strict():
    # DPS's create_model: channel_mult "" at 256 is (1, 1, 2, 2, 4, 4); attention "16" is downsample rate 16.
    shapes = adm_state_dict_shapes(128, 1, (1, 1, 2, 2, 4, 4), (16,), 6)
    with torch.device("meta"):
        model = create_model(**DPS_FFHQ_MODEL_CONFIG)
        fake = {k: torch.empty(v) for k, v in shapes.items()}
    model.load_state_dict(fake, strict=True, assign=True)
    assert [k for k in model.state_dict()] == list(shapes)
    # PAG's blocks on this model: attention at 16 x 16, two heads of 64 channels each.
    names = [n for n, m in model.named_modules() if type(m).__name__ == "AttentionBlock"]
    assert "middle_block.1" in names and len(names) == 4


# --- scripts/inverse_sample.py ------------------------------------------------------------------------------------

SCRIPT_MODEL = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    diffusion_steps=100, timestep_respacing="3",
)


@pytest.fixture(scope="module")
def inverse_script(tmp_path_factory):
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    module = load_script("inverse_sample")
    folder = tmp_path_factory.mktemp("inverse")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **SCRIPT_MODEL})
    randomize_zero_params(model, 0)
    torch.save(model.state_dict(), folder / "model.pt")
    ys, xs = np.mgrid[0:16, 0:16]
    images = np.stack([np.stack([(ys * 16 + k * 40) % 256, (xs * 16) % 256, np.full((16, 16), 30 * k)], -1)
                       for k in range(4)]).astype(np.uint8)
    np.savez(folder / "data.npz", images)
    return SimpleNamespace(module=module, model=str(folder / "model.pt"), data=str(folder / "data.npz"), images=images)


def _script_flags(**values):
    return flags({**SCRIPT_MODEL, **values})


def test_inverse_sample_outputs_draw_order_and_batch_independence(inverse_script, tmp_path):
    from guided_diffusion.run.image_output import to_uint8_images

    common = dict(
        model_path=inverse_script.model, data_dir=inverse_script.data, num_samples=3, task="inpainting",
        mask_type="box", mask_len_range="4,7", mask_margin="2,2", dps_scale=0.5, pag_scale=1.0, pag_layers="middle",
        seed=5,
    )
    path = inverse_script.module.main(_script_flags(batch_size=2, out_dir=tmp_path / "a", **common))
    with np.load(path) as data:
        recon, meas, truth = data["arr_0"], data["arr_1"], data["arr_2"]
    assert recon.shape == meas.shape == truth.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(truth, inverse_script.images[:3])
    # Image i's first draw seeds its mask, the next ones are its measurement noise: rebuild them independently.
    for i in range(3):
        gen = sample_generator(5, i)
        seed = int(torch.randint(2**31 - 1, (), generator=gen))
        mask = dps_box_mask(seed, 16, (4, 7), (2, 2))
        x = torch.from_numpy(truth[i : i + 1]).float().permute(0, 3, 1, 2) / 127.5 - 1
        y = x * mask + torch.randn((3, 16, 16), generator=gen)[None] * 0.05
        np.testing.assert_array_equal(meas[i : i + 1], to_uint8_images(y.clamp(-1, 1)))
    grid = tmp_path / "a" / "grid.png"
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size == (3 * (64 + 2) + 2, 3 * (64 + 2) + 2)  # 3 rows of (measurement | recon | truth)
        pixels = np.asarray(im.convert("RGB"))
    for i in range(3):
        for j, image in enumerate((meas[i], recon[i], truth[i])):
            top, left = 2 + i * 66, 2 + j * 66
            np.testing.assert_array_equal(pixels[top : top + 64 : 4, left : left + 64 : 4], image)
    # The batch size does not change what image i becomes.
    again = inverse_script.module.main(_script_flags(batch_size=1, out_dir=tmp_path / "b", **common))
    with np.load(again) as data:
        assert np.abs(data["arr_0"].astype(int) - recon).max() <= 1
        np.testing.assert_array_equal(data["arr_1"], meas)


def test_inverse_sample_super_resolution_measurements(inverse_script, tmp_path):
    path = inverse_script.module.main(_script_flags(
        model_path=inverse_script.model, data_dir=inverse_script.data, num_samples=2, batch_size=2,
        task="super_resolution", scale_factor=2, out_dir=tmp_path / "sr", grid="",
    ))
    with np.load(path) as data:
        assert data["arr_0"].shape == (2, 16, 16, 3) and data["arr_1"].shape == (2, 8, 8, 3)
    assert not (tmp_path / "sr" / "grid.png").exists()


def _bad_inputs(tmp_path, inverse_script):
    np.save(tmp_path / "mask8.npy", np.ones((8, 8)))
    np.savez(tmp_path / "small.npz", inverse_script.images[:, :8, :8])
    (tmp_path / "empty").mkdir()
    return [
        (dict(task="deblur"), "argument --task: invalid choice: 'deblur' (choose from 'gaussian_blur', 'motion_blur', "),
        (dict(), "--task is required: the inverse problem to solve, one of gaussian_blur, motion_blur, super_resolution"),
        (dict(task="inpainting", mask_path=tmp_path / "mask8.npy"), "is 8x8 but the images are 16x16"),
        (dict(task="inpainting", mask_path=tmp_path / "empty"), "--mask_path '%s' is a folder, not a file" % (tmp_path / "empty")),
        (dict(data_dir=tmp_path / "small.npz"), "is 8x8 pixels but the model (--image_size 16) needs 16x16"),
        (dict(data_dir=tmp_path / "empty"), "holds no image files"),
        (dict(data_dir=tmp_path / "nothing"), "no such file or folder"),
        (dict(task="super_resolution", scale_factor=3), "scale_factor 3 does not divide the image size 16 x 16"),
        (dict(task="inpainting", mask_type="circle"), "argument --mask_type: invalid choice: 'circle'"),
        (dict(task="inpainting", mask_len_range="12,15"), "does not fit an image of 16 pixels"),
        (dict(task="gaussian_blur", kernel_size=61), "kernel_size 61 needs images larger than 30 pixels"),
        (dict(use_ddim=True), "--use_ddim True is not supported"),
        (dict(num_samples=9), "--num_samples 9 is more than the 4 images"),
    ]


def test_inverse_sample_bad_input_one_message_nothing_written(inverse_script, tmp_path, capsys):
    for bad, message in _bad_inputs(tmp_path, inverse_script):
        values = dict(model_path=inverse_script.model, data_dir=inverse_script.data, out_dir=tmp_path / "run")
        values.update(bad)
        with pytest.raises(SystemExit) as rejected:
            inverse_script.module.main(_script_flags(**values))
        assert rejected.value.code == 2, bad
        err = capsys.readouterr().err
        assert err.count(": error: ") == 1 and message in err, (bad, err)
        assert not (tmp_path / "run").exists()


def test_inverse_sample_reads_a_folder_in_the_training_loaders_order(inverse_script, tmp_path):
    from PIL import Image

    from evaluations.make_reference_batch import FolderSource
    from guided_diffusion.image_datasets import list_image_files

    # ADM's order puts folder a's files where "a" sorts, before a.png; a plain sort of full paths would not.
    names = ["b.png", "a/x.png", "a.png"]
    (tmp_path / "data" / "a").mkdir(parents=True)
    for name, image in zip(names, inverse_script.images):
        Image.fromarray(image).save(tmp_path / "data" / name)
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    listed = list_image_files(str(tmp_path / "data"))
    assert [os.path.relpath(f, tmp_path / "data") for f in listed] == ["a/x.png", "a.png", "b.png"]
    assert FolderSource(str(tmp_path / "data"), 16, 3).files == listed
    path = inverse_script.module.main(_script_flags(
        model_path=inverse_script.model, data_dir=tmp_path / "data", num_samples=3, batch_size=3,
        task="super_resolution", scale_factor=2, out_dir=tmp_path / "run", grid="",
    ))
    with np.load(path) as data:
        np.testing.assert_array_equal(data["arr_2"], inverse_script.images[[1, 2, 0]])


def test_a_configs_relative_path_run_elsewhere_says_where_it_is(inverse_script, tmp_path, monkeypatch, capsys):
    # The digits16_inverse_* configs name datasets/digits16.npz relative to the repository root.
    from guided_diffusion.common.errors import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        inverse_script.module.main(_script_flags(model_path=inverse_script.model, data_dir="datasets/digits16.npz"))
    err = capsys.readouterr().err
    assert f"--data_dir 'datasets/digits16.npz': no such file or folder in {tmp_path}; it is relative to the " \
           f"repository root: run from {REPO_ROOT} or pass an absolute path" in err
    with pytest.raises(SystemExit):
        inverse_script.module.main(_script_flags(model_path=inverse_script.model, data_dir="datasets/none.npz"))
    assert "repository root" not in capsys.readouterr().err
