"""
Cost of one DPS step with PAG relative to one without, on DPS's FFHQ 256 ADM architecture (configs/model_config.yaml
of DPS: 128 channels, one res block per level, attention at downsample rate 16, 64 head channels, scale-shift norm,
resblock up/down, learned sigmas) with random weights, batch 1, Gaussian deblurring (DPS's 61 x 61, sigma 3 kernel).

A DPS step is a forward pass with autograd, the measurement loss and a backward pass to x_t only (no weight
gradients). PAG adds one perturbed forward pass without autograd and no backward work (the measurement gradient goes
through the unperturbed x0; see guided_diffusion/methods/inverse.py), so the ratio should be 1 + (perturbed pass / plain
step), printed as "from parts". That pass is a smaller share of a step at 256 px (about 0.3 on a CPU) than at 64 px
(about 0.45), because the backward to x_t grows faster with the image than the forward pass does. --gradient_through guided
backpropagates through both branches instead (expected about 2).

--image_size keeps the architecture (channel_mult 1,1,2,2,4,4, attention where the feature map is image_size/16)
and shrinks the activations, so the default 64 finishes in a few minutes on a CPU; 256 is the real model.

Example:
  python benchmarks/dps_step.py                       # CPU, image_size 64
  python benchmarks/dps_step.py --image_size 256 --device cuda --repeats 10
"""

import argparse
import statistics

import torch as th

from guided_diffusion.common.atomic_io import write_json_atomic
from guided_diffusion.methods.inverse import add_measurement_noise, create_operator, dps_sample
from guided_diffusion.methods.pag import PAGGuidedModel
from guided_diffusion.script_util import create_gaussian_diffusion, create_model
from pag_overhead import timed  # (this folder is on sys.path when a benchmark runs as a script)


def dps_ffhq_model(image_size):
    return create_model(
        image_size=image_size,
        num_channels=128,
        num_res_blocks=1,
        channel_mult="1,1,2,2,4,4",
        learn_sigma=True,
        attention_resolutions=str(image_size // 16),
        num_heads=4,
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )


def randomize(model, seed=0):
    gen = th.Generator().manual_seed(seed)
    with th.no_grad():
        for p in model.parameters():
            p.copy_(th.randn(p.shape, generator=gen).to(p) * 0.02)
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on other devices)")
    parser.add_argument("--pag_scale", type=float, default=3.0)
    parser.add_argument("--pag_layers", default="middle")
    parser.add_argument("--gradient_through", default="plain", choices=["plain", "guided"])
    parser.add_argument("--out", default="", help="also write the timings to this JSON file")
    args = parser.parse_args(argv)
    if args.image_size % 32 or args.image_size < 64:
        parser.error("--image_size must be a multiple of 32 and at least 64 (six levels, a 61 x 61 blur kernel)")
    if args.device == "cpu":
        th.set_num_threads(args.threads)
    device = th.device(args.device)

    model = randomize(dps_ffhq_model(args.image_size)).to(device)
    guided = PAGGuidedModel(model, args.pag_scale, args.pag_layers)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear")
    operator = create_operator("gaussian_blur", kernel_size=61, intensity=3.0, device=device)
    gen = th.Generator().manual_seed(0)
    x0 = (th.rand(1, 3, args.image_size, args.image_size, generator=gen) * 2 - 1).to(device)
    y = add_measurement_noise(operator.forward(x0), 0.05)
    x_t = th.randn(x0.shape, generator=gen).to(device)
    t = th.tensor([500], device=device)

    def step(m):
        return timed(
            lambda: dps_sample(diffusion, m, x_t, t, y, operator, 1.0, gradient_through=args.gradient_through), device
        )

    def perturbed_pass():
        # What PAG adds to a step: the perturbed branch, without autograd.
        with th.no_grad():
            return timed(lambda: guided._perturbed_pass(x_t, t, {}, True), device)

    step(model), step(guided), perturbed_pass()  # warm-up
    plain, pag, extra = [], [], []
    for _ in range(args.repeats):
        # Interleaved, so background load hits all alike.
        plain.append(step(model))
        pag.append(step(guided))
        extra.append(perturbed_pass())
    result = {
        "image_size": args.image_size,
        "device": str(device),
        "threads": th.get_num_threads() if device.type == "cpu" else None,
        "pag_layers": guided.layers,
        "gradient_through": args.gradient_through,
        "dps_step_s": statistics.median(plain),
        "dps_pag_step_s": statistics.median(pag),
        "perturbed_pass_s": statistics.median(extra),
    }
    result["ratio"] = result["dps_pag_step_s"] / result["dps_step_s"]
    result["ratio_from_parts"] = 1 + result["perturbed_pass_s"] / result["dps_step_s"]
    print(
        f"DPS step, ADM FFHQ architecture at {args.image_size}px, batch 1, {device}: "
        f"{result['dps_step_s']:.3f} s without PAG, {result['dps_pag_step_s']:.3f} s with PAG "
        f"(layers {','.join(guided.layers)}, gradient through the {args.gradient_through} x0): "
        f"ratio {result['ratio']:.2f} (median of {args.repeats}); the perturbed pass alone takes "
        f"{result['perturbed_pass_s']:.3f} s, i.e. 1 + {result['perturbed_pass_s']:.3f} / {result['dps_step_s']:.3f} "
        f"= {result['ratio_from_parts']:.2f}"
    )
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
