"""
Device placement on the CPU: PyTorch's `meta` device stands in for the accelerator, and a TorchDispatchMode fails on
any non-scalar CPU tensor or CPU generator that enters an op together with meta tensors (on CUDA that op would
raise, or a CPU generator would silently draw on the wrong device). Explicit moves (.to, copy_) are allowed: they
are how CPU data is meant to reach the device.

Meta alone does not catch these mixes (many meta kernels accept CPU operands), the mode does.
"""

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from guided_diffusion.methods.inverse import create_operator, dps_sample
from guided_diffusion.methods.pag import PAGGuidedModel
from guided_diffusion.common.random_streams import PerSampleNoise, sample_generator
from guided_diffusion.methods.sag import SAGGuidedModel
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

ACCELERATOR = th.device("meta")
# Ops that move data between devices, or read a scalar back: allowed to see both devices.
TRANSFERS = {"aten._to_copy.default", "aten.copy_.default", "aten.lift_fresh.default",
             "aten._local_scalar_dense.default"}


class WrongDevice(AssertionError):
    pass


class DevicePlacementChecker(TorchDispatchMode):
    """
    Fail on any op that gets a meta tensor (or makes one) and also a CPU tensor with at least one dimension, or a
    CPU generator.

    Meta tensors hold no values, so the few reads of a device value the code makes (bool(mask.all()) and the
    like, a sync on CUDA) get made-up answers: all() reads as `all_rows`, any() as its negation, anything else as
    1, so all_rows=False takes the code paths for a subset of the rows. Boolean indexing on meta assumes every row
    is selected (meta_nonzero_assume_all_nonzero).
    """

    def __init__(self, all_rows=True):
        super().__init__()
        self.all_rows = all_rows
        self.answers = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, th.Tensor)]
        on_accelerator = any(t.device == ACCELERATOR for t in tensors) or kwargs.get("device") == ACCELERATOR
        if on_accelerator and str(func) not in TRANSFERS and not str(func).startswith("aten.to."):
            cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            generators = [a for a in flat if isinstance(a, th.Generator) and a.device.type == "cpu"]
            if cpu or generators:
                raise WrongDevice(
                    f"{func} mixes accelerator tensors with CPU tensor(s) of shape {cpu}"
                    + (f" and {len(generators)} CPU generator(s)" if generators else "")
                )
        if on_accelerator:
            name = str(func)
            if name == "aten._local_scalar_dense.default":
                return self.answers.get(id(args[0]), 1)
            out = func(*args, **kwargs)
            if name.startswith("aten.all"):
                self.answers[id(out)] = self.all_rows
            elif name.startswith("aten.any"):
                self.answers[id(out)] = not self.all_rows
            return out
        return func(*args, **kwargs)


TINY = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    num_heads=2, learn_sigma=True, class_cond=True, diffusion_steps=100, timestep_respacing="4",
)


@pytest.fixture(autouse=True)
def meta_boolean_indexing(monkeypatch):
    import torch.fx.experimental._config as fx_config

    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)


@pytest.fixture(scope="module")
def built():
    th.manual_seed(0)
    flags = model_and_diffusion_defaults()
    flags.update(TINY)
    model, diffusion = create_model_and_diffusion(**flags)
    classifier_flags = classifier_defaults()
    classifier_flags.update(image_size=16, classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
                            classifier_attention_resolutions="8")
    classifier = create_classifier(**classifier_flags)
    return model.to(ACCELERATOR).eval(), diffusion, classifier.to(ACCELERATOR).eval()


def _batch(n=2):
    generators = [sample_generator(7, i) for i in range(n)]
    noise = PerSampleNoise(generators)
    x = noise.draw((n, 3, 16, 16), ACCELERATOR)
    y = th.tensor([1, 3][:n], device=ACCELERATOR)
    return x, y, noise


def test_checker_catches_a_cpu_tensor_and_generator():
    x = th.empty(2, 3, device=ACCELERATOR)
    with DevicePlacementChecker():
        x + th.ones(()) * 2  # a CPU scalar is fine, as on CUDA
        x + th.ones(2, 3).to(ACCELERATOR)  # moved first: fine
        with pytest.raises(WrongDevice, match=r"aten.add.Tensor mixes accelerator tensors with CPU tensor\(s\) of "
                                              r"shape \[\(2, 3\)\]"):
            x + th.ones(2, 3)
        with pytest.raises(WrongDevice, match="CPU generator"):
            th.randn(x.shape, generator=th.Generator(), device=ACCELERATOR)


def test_unet_forward_with_pag_rows(built):
    model, diffusion, _ = built
    x, y, _ = _batch()
    # Row 0 inside the interval, row 1 outside: PAG runs its perturbed branch on a subset of the rows.
    guided = PAGGuidedModel(model, scale=2.0, layers="middle", t_range=(0, 4))
    t = th.tensor([3, 8], device=ACCELERATOR)
    with DevicePlacementChecker(all_rows=False):
        out = model(x, t, y=y)
        guided_out = guided(x, t, y=y)
    assert out.shape == guided_out.shape == (2, 6, 16, 16) and guided_out.device == ACCELERATOR


@pytest.mark.parametrize("kind", ["identity", "blur", "drop"])
def test_ddpm_and_ddim_steps_with_pag(built, kind):
    model, diffusion, _ = built
    x, y, noise = _batch()
    params = {"blur": dict(blur_sigma=1.0), "drop": dict(drop_rate=0.5)}.get(kind, {})
    guided = PAGGuidedModel(model, scale=3.0, layers="middle", kind=kind, **params)
    t = th.tensor([2, 2], device=ACCELERATOR)
    with DevicePlacementChecker():
        ddpm = diffusion.p_sample(guided, x, t, model_kwargs={"y": y}, noise_fn=noise)
        ddim = diffusion.ddim_sample(guided, x, t, model_kwargs={"y": y}, noise_fn=noise)
    assert ddpm["sample"].device == ddim["sample"].device == ACCELERATOR


def test_ddpm_step_with_sag(built):
    model, diffusion, _ = built
    x, y, noise = _batch()
    guided = SAGGuidedModel(model, diffusion, scale=0.5, layer="middle", blur_sigma=1.0)
    t = th.tensor([3, 1], device=ACCELERATOR)
    with DevicePlacementChecker():
        out = diffusion.p_sample(guided, x, t, model_kwargs={"y": y}, noise_fn=noise)
    assert out["sample"].device == ACCELERATOR


def test_ddpm_step_with_classifier_guidance(built):
    model, diffusion, classifier = built
    x, y, noise = _batch()

    def cond_fn(x, t, y=None):
        # As scripts/classifier_sample.py computes it.
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            return th.autograd.grad(chosen.sum(), x_in)[0] * 2.0

    guided = PAGGuidedModel(model, scale=1.0, layers="middle")
    t = th.tensor([2, 2], device=ACCELERATOR)
    with DevicePlacementChecker():
        out = diffusion.p_sample(guided, x, t, model_kwargs={"y": y}, cond_fn=cond_fn, noise_fn=noise)
    assert out["sample"].device == ACCELERATOR


@pytest.mark.parametrize("task, params", [
    ("gaussian_blur", dict(kernel_size=5, intensity=1.0)),
    ("super_resolution", dict(in_shape=(2, 3, 16, 16), scale_factor=2)),
    ("inpainting", dict(mask_type="box", mask_len_range=(4, 5), image_size=16, margin=(2, 2))),
])
def test_dps_step(built, task, params):
    model, diffusion, _ = built
    x, y, noise = _batch()
    operator = create_operator(task, **params)
    if task == "inpainting":
        operator.set_mask(operator.new_mask(0).expand(2, -1, -1, -1))
    operator = operator.to(ACCELERATOR)
    measurement = th.empty(operator.measurement_shape(tuple(x.shape)), device=ACCELERATOR)
    t = th.tensor([2, 2], device=ACCELERATOR)
    with DevicePlacementChecker():
        out = dps_sample(diffusion, model, x, t, measurement, operator, 1.0, model_kwargs={"y": y}, noise_fn=noise)
    assert out["sample"].device == ACCELERATOR


def test_evaluator_feature_extraction():
    from evaluations.digits_net import DigitsNet
    from evaluations.inception import FIDInceptionV3, InceptionFeatureNet

    images = th.empty(2, 16, 16, 3, device=ACCELERATOR)
    # Built on the CPU: the fast network folds the weights, which needs their values.
    inception = FIDInceptionV3()
    nets = [InceptionFeatureNet(inception, "inception", fast=True), InceptionFeatureNet(inception, "inception",
                                                                                        fast=False), DigitsNet()]
    for net in nets:
        net = net.to(ACCELERATOR)
        with DevicePlacementChecker():
            pool, spatial = net(images)
            logits = net.logits(pool)
        assert pool.device == spatial.device == logits.device == ACCELERATOR


def test_checker_catches_an_injected_wrong_device_tensor(built, monkeypatch):
    # The bug this suite guards against: a schedule array turned into a tensor without moving it to x's device.
    import guided_diffusion.gaussian_diffusion as gd

    def extract_on_cpu(arr, timesteps, broadcast_shape):
        res = th.from_numpy(np.asarray(arr))[timesteps].float()
        while len(res.shape) < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    model, diffusion, _ = built
    x, y, noise = _batch()
    monkeypatch.setattr(gd, "_extract_into_tensor", extract_on_cpu)
    t = th.tensor([2, 2], device=ACCELERATOR)
    with DevicePlacementChecker(), pytest.raises(WrongDevice, match="mixes accelerator tensors with CPU tensor"):
        diffusion.p_sample(model, x, t, model_kwargs={"y": y}, noise_fn=noise)
