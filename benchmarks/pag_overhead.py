"""
Cost of a PAG-guided model call relative to a plain call, on ADM's 256x256 class-conditional architecture with
random weights and the official PAG layers.

Compares, in one run and interleaved so that background load hits every variant alike:
  plain                  model(x, t, y)
  naive two-pass         PAGGuidedModel(batched=False): a plain pass, then a perturbed pass
  batched                PAGGuidedModel(share_prefix=False): one pass on the doubled batch
  batched+shared prefix  PAGGuidedModel(): the stages before the first perturbed block once, then doubled

Beside the measured ratio it prints each variant's floating-point operations relative to the plain call (counted by
torch.utils.flop_counter on the first warmup call): the ratio a device saturated by the plain call would show. A
measured ratio far below it means the plain call left the device idle (small batch, or other jobs on the machine).

Example (CPU, a few minutes on two cores):
  python benchmarks/pag_overhead.py --image_size 64 --batch_size 2
"""

import argparse
import json
import os
import statistics
import time

import torch as th
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from guided_diffusion.common.atomic_io import write_json_atomic
from guided_diffusion.methods.pag import OFFICIAL_IMAGENET256_LAYERS, PAGGuidedModel
from guided_diffusion.script_util import create_model, model_and_diffusion_defaults

DEFAULT_SPECS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "adm_reference",
    "state_dict_specs.json",
)

# ADM's README flags for 256x256_diffusion, used when the reference specs are not available.
ADM256_FLAGS = dict(
    attention_resolutions="32,16,8",
    class_cond=True,
    image_size=256,
    learn_sigma=True,
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
    resblock_updown=True,
    use_scale_shift_norm=True,
)


def model_flags(specs_path):
    flags = dict(ADM256_FLAGS)
    if specs_path and os.path.exists(specs_path):
        with open(specs_path) as f:
            flags = json.load(f)["256x256_diffusion"]["flags"]
    defaults = model_and_diffusion_defaults()
    merged = {**defaults, **flags}
    # create_model takes only the architecture flags; diffusion flags (steps, schedule) are not needed here.
    keys = [
        "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
        "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
        "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order",
    ]
    return {k: merged[k] for k in keys}


def timed(fn, device):
    if device.type == "cuda":
        th.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        th.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=64, help="input resolution (the model is built for 256)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--layers", default=OFFICIAL_IMAGENET256_LAYERS)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--use_fp16", action="store_true", help="convert the torso to float16 (GPU)")
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="state_dict_specs.json for the model flags")
    parser.add_argument("--output", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.image_size <= 0 or args.image_size % 32:
        parser.error("--image_size must be a positive multiple of 32 (the U-Net downsamples five times)")
    if args.batch_size <= 0 or args.repeats <= 0 or args.warmup < 0:
        parser.error("--batch_size and --repeats must be positive, --warmup non-negative")
    if args.threads:
        th.set_num_threads(args.threads)

    device = th.device(args.device)
    th.manual_seed(0)
    flags = model_flags(args.specs)
    model = create_model(**flags).to(device).eval()
    if args.use_fp16:
        model.convert_to_fp16()
    x = th.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    t = th.randint(0, 1000, (args.batch_size,), device=device)
    y = th.randint(0, 1000, (args.batch_size,), device=device)

    variants = {
        "plain": model,
        "naive two-pass": PAGGuidedModel(model, args.scale, args.layers, batched=False),
        "batched": PAGGuidedModel(model, args.scale, args.layers, share_prefix=False),
        "batched+shared prefix": PAGGuidedModel(model, args.scale, args.layers),
    }
    times = {name: [] for name in variants}
    flops = {}
    with th.no_grad():
        # The first warmup call of each variant also counts its operations (so there is always one warmup call).
        for name, fn in variants.items():
            with FlopCounterMode(display=False) as counter:
                fn(x, t, y=y)
            flops[name] = counter.get_total_flops()
        for _ in tqdm(range(args.warmup - 1), desc="warmup", disable=args.warmup <= 1):
            for fn in variants.values():
                fn(x, t, y=y)
        # Interleaved, so slow phases of the shared machine fall on every variant.
        for _ in tqdm(range(args.repeats), desc="timing"):
            for name, fn in variants.items():
                times[name].append(timed(lambda: fn(x, t, y=y), device))

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"ADM-256 class-conditional architecture ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
        f"parameters, random weights), input {args.batch_size}x3x{args.image_size}x{args.image_size}, "
        f"device {device}, threads {th.get_num_threads()}, layers {args.layers}, "
        f"median of {args.repeats} after {max(args.warmup, 1)} warmup"
    )
    print(f"{'variant':<24}{'median s':>10}{'/ plain':>9}{'FLOPs / plain':>15}")
    for name, median in medians.items():
        print(f"{name:<24}{median:>10.3f}{median / medians['plain']:>9.2f}{flops[name] / flops['plain']:>15.2f}")
    if args.output:
        write_json_atomic(
            args.output,
            {"args": vars(args), "flags": flags, "seconds": times, "median_seconds": medians,
             "ratio_to_plain": {name: m / medians["plain"] for name, m in medians.items()},
             "flops": flops, "flops_ratio_to_plain": {name: f / flops["plain"] for name, f in flops.items()}},
        )


if __name__ == "__main__":
    main()
