"""
A script written for the original package runs unchanged against ours: it builds with create_model_and_diffusion,
loads a state dict and samples with p_sample_loop / ddim_sample_loop, with a classifier cond_fn as in ADM's
classifier_sample.py.
"""

import torch
import torch.nn.functional as F

from guided_diffusion.script_util import (
    NUM_CLASSES,
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

from conftest import TINY_ADM_FLAGS

FLAGS = dict(TINY_ADM_FLAGS, diffusion_steps=100, timestep_respacing="3")


def adm_style_sampling(tmp_path, use_ddim):
    # Written the way ADM's scripts are: only names the original package exports.
    args = model_and_diffusion_defaults()
    args.update(FLAGS)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    model.load_state_dict(torch.load(path, map_location="cpu"))
    model.eval()

    cargs = classifier_defaults()
    cargs.update(image_size=32, classifier_width=64, classifier_depth=1, classifier_attention_resolutions="8")
    # Released classifiers use a 64-channel head width; 32x32 needs an explicit shape, so build it directly.
    classifier = create_classifier(**{**cargs, "image_size": 64})
    classifier.eval()

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            big = F.interpolate(x_in, size=64, mode="nearest")
            logits = classifier(big, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * 1.0

    def model_fn(x, t, y=None):
        return model(x, t, y if args["class_cond"] else None)

    torch.manual_seed(1)
    classes = torch.randint(low=0, high=NUM_CLASSES, size=(2,))
    sample_fn = diffusion.p_sample_loop if not use_ddim else diffusion.ddim_sample_loop
    sample = sample_fn(
        model_fn,
        (2, 3, args["image_size"], args["image_size"]),
        clip_denoised=True,
        model_kwargs={"y": classes},
        cond_fn=cond_fn,
    )
    return ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def test_adm_style_script_ddpm_and_ddim(tmp_path):
    ddpm = adm_style_sampling(tmp_path, use_ddim=False)
    assert ddpm.shape == (2, 3, 32, 32) and ddpm.dtype == torch.uint8
    ddim = adm_style_sampling(tmp_path, use_ddim=True)
    assert ddim.shape == (2, 3, 32, 32)
    assert not torch.equal(ddpm, ddim)
    # Same seed, same samples.
    assert torch.equal(ddim, adm_style_sampling(tmp_path, use_ddim=True))


def test_spaced_diffusion_keeps_original_timesteps_for_the_model():
    args = model_and_diffusion_defaults()
    args.update(FLAGS)
    _, diffusion = create_model_and_diffusion(**args)
    seen = []

    def model(x, t, **kwargs):
        seen.append(int(t[0]))
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    diffusion.p_sample_loop(model, (1, 3, 8, 8), model_kwargs={})
    # "4" sections of 100 steps: timesteps 0, 50, 99 (rounded from 49.5) visited from the top.
    assert seen == [99, 50, 0]
