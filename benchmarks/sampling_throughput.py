"""
Sampling throughput of a DDIM PAG run on ADM's 256x256 architecture (random weights): plain ADM sampling, PAG the
way the official code runs it, and PAG the way this repository runs it, at the same batch size and precision.

Variants (timed in one run, interleaved so background load hits every variant alike):
  ADM plain, einsum           ddim_sample_loop(model), ADM's einsum attention: the baseline
  ADM plain, sdpa             the same with torch's scaled_dot_product_attention (shows the attention speed-up alone)
  official PAG: 2 passes      a plain pass and a separate perturbed pass per step, einsum attention
  ours: batched+prefix, sdpa  PAGGuidedModel(): one pass on the doubled batch after a shared prefix, sdpa
Optional extra rows (--extra): "channels_last" and "compile" (torch.compile of the torso), both on top of ours.

The model, the PAG scale and layers come from a flag file (default configs/adm256/adm256_cond_ddim25_pag.cfg, i.e. the
official layers input_blocks.14.1,16.1,17.1 and middle_block.1 at s = 3). Defaults depend on --device:
  cpu:   a reduced size that finishes in a few minutes: 64x64 inputs, 64 base channels, DDIM 2 steps, batch 2
  cuda:  the paper's setting: 256x256, 256 channels (554M parameters), DDIM 25 steps, batch 16
Peak memory: on CUDA the peak allocated memory during a run (model weights included); on the CPU the peak
resident memory a run adds over the loaded model, measured once per variant in a fresh subprocess.

Examples:
  python benchmarks/sampling_throughput.py
  python benchmarks/sampling_throughput.py --device cuda --image_size 256 --use_fp16 --batch_size 16
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

import torch as th
from tqdm.auto import tqdm

from guided_diffusion.common import attention_backends
from guided_diffusion.common.atomic_io import write_json_atomic
from guided_diffusion.run.flag_files import config_flags, resolve_config
from guided_diffusion.methods.pag import PAGGuidedModel
from guided_diffusion.run.precision import apply_precision_policy
from guided_diffusion.script_util import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)
from pag_overhead import timed  # (this folder is on sys.path when a benchmark runs as a script)

DEVICE_DEFAULTS = {
    "cpu": dict(image_size=64, num_channels=64, steps=2, batch_size=2, repeats=3, warmup=1),
    "cuda": dict(image_size=256, num_channels=256, steps=25, batch_size=16, repeats=3, warmup=1),
}
VARIANTS = ("ADM plain, einsum", "ADM plain, sdpa", "official PAG: 2 passes, einsum", "ours: batched+prefix, sdpa")
EXTRAS = {"channels_last": "ours + channels_last", "compile": "ours + torch.compile"}
BASELINE = VARIANTS[0]
OFFICIAL = VARIANTS[2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="adm256_cond_ddim25_pag", help="flag file with the model and PAG flags")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image_size", type=int, default=None, help="input resolution (the model is built for 256)")
    parser.add_argument("--num_channels", type=int, default=None, help="base channels (the config's value: 256)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--use_fp16", action="store_true", help="convert the torso to float16, as --use_fp16 does")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first")
    parser.add_argument("--extra", default="", help="comma-separated extra rows: channels_last, compile")
    parser.add_argument("--memory", type=str2bool, default=True, help="measure peak memory")
    parser.add_argument("--allow_tf32", action="store_true",
                        help="let CUDA use TF32 in convolutions and matmuls (the samplers' --allow_tf32; default off, "
                        "as sampling runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="also write the figures to this JSON file")
    parser.add_argument("--memory_probe", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    kind = th.device(args.device).type
    if kind not in DEVICE_DEFAULTS:
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if kind == "cuda" and not th.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    for key, value in DEVICE_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size <= 0 or args.image_size % 32:
        parser.error("--image_size must be a positive multiple of 32 (the U-Net downsamples five times)")
    if args.num_channels <= 0 or args.num_channels % 32:
        parser.error("--num_channels must be a positive multiple of 32 (GroupNorm uses 32 groups)")
    if args.steps <= 0 or args.batch_size <= 0 or args.repeats <= 0 or args.warmup < 0:
        parser.error("--steps, --batch_size and --repeats must be positive, --warmup non-negative")
    args.extra = [name.strip() for name in args.extra.split(",") if name.strip()]
    unknown = [name for name in args.extra if name not in EXTRAS]
    if unknown:
        parser.error(f"unknown --extra {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    if args.use_fp16 and kind == "cpu":
        print("note: float16 on the CPU uses slow reference kernels; --use_fp16 is meant for CUDA", file=sys.stderr)
    try:
        args.config_path = resolve_config(args.config)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run_flags(args):
    """
    The config's model, diffusion and PAG flags, typed as script_util's defaults, with this run's overrides.
    """
    raw = config_flags(args.config_path)
    defaults = model_and_diffusion_defaults()
    flags = {}
    for key, default in defaults.items():
        if key not in raw:
            flags[key] = default
        elif isinstance(default, bool):
            flags[key] = str2bool(raw[key])
        else:
            flags[key] = type(default)(raw[key])
    if "pag_scale" not in raw or "pag_layers" not in raw:
        raise SystemExit(f"{args.config_path} sets no --pag_scale/--pag_layers; pass a *_pag config")
    flags.update(num_channels=args.num_channels, use_fp16=args.use_fp16, timestep_respacing=f"ddim{args.steps}")
    return flags, float(raw["pag_scale"]), raw["pag_layers"]


def randomize_zero_layers(model):
    """
    Give ADM's zero-initialised layers (each residual branch's last conv, proj_out, the output conv) default random
    weights, as a trained checkpoint has: at zero the model's output is constant and the attention unused.
    """
    for module in model.modules():
        if isinstance(module, (th.nn.Conv1d, th.nn.Conv2d, th.nn.Linear)) and not module.weight.detach().any():
            module.reset_parameters()


def build(args):
    flags, scale, layers = run_flags(args)
    device = th.device(args.device)
    th.manual_seed(args.seed)
    try:
        model, diffusion = create_model_and_diffusion(**flags)
    except ValueError as exc:
        raise SystemExit(f"cannot build the model and a DDIM {args.steps}-step sampler: {exc}") from None
    randomize_zero_layers(model)
    model.to(device).eval()
    if args.use_fp16:
        model.convert_to_fp16()
    gen = th.Generator().manual_seed(args.seed + 1)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    noise = th.randn(*shape, generator=gen).to(device)
    kwargs = {}
    if flags["class_cond"]:
        kwargs["y"] = th.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    return flags, scale, layers, model, diffusion, noise, kwargs


def make_variants(args, model, scale, layers):
    """
    name -> (callable model for the sampler, attention backend, the module it runs: model or an extra's copy).

    The extra rows' copies (channels_last, compile) are kept on the CPU and moved to the device only for their own
    runs (see on_device), so no row's peak memory holds another row's weights.
    """
    variants = {
        VARIANTS[0]: (model, "einsum", model),
        VARIANTS[1]: (model, "sdpa", model),
        VARIANTS[2]: (PAGGuidedModel(model, scale, layers, batched=False), "einsum", model),
        VARIANTS[3]: (PAGGuidedModel(model, scale, layers), "sdpa", model),
    }
    if "channels_last" in args.extra:
        fast = copy.deepcopy(model).to("cpu").to(memory_format=th.channels_last)
        variants[EXTRAS["channels_last"]] = (PAGGuidedModel(fast, scale, layers), "sdpa", fast)
    if "compile" in args.extra:
        compiled = copy.deepcopy(model).to("cpu")
        # The torso loop is what both the plain forward and PAG's shared prefix call; compiling it keeps
        # PAGGuidedModel's prefix sharing, which a compiled wrapper around the whole model would disable.
        compiled.run_stages = th.compile(compiled.run_stages)
        variants[EXTRAS["compile"]] = (PAGGuidedModel(compiled, scale, layers), "sdpa", compiled)
    if th.device(args.device).type == "cuda":
        th.cuda.empty_cache()
    return variants


class on_device:
    """
    With an extra row's copy: move the main model off the device and the copy onto it for the run, and back after
    (nothing to do for the main model's own rows, or on the CPU).
    """

    def __init__(self, module, model, device):
        self.swap = module is not model and device.type != "cpu"
        self.module, self.model, self.device = module, model, device

    def __enter__(self):
        if self.swap:
            self.model.to("cpu")
            th.cuda.empty_cache()
            self.module.to(self.device)

    def __exit__(self, *exc):
        if self.swap:
            self.module.to("cpu")
            th.cuda.empty_cache()
            self.model.to(self.device)


def sample(diffusion, fn, backend, noise, kwargs, channels_last=False):
    x = noise.contiguous(memory_format=th.channels_last) if channels_last else noise
    with th.no_grad(), attention_backends.attention_backend(backend):
        return diffusion.ddim_sample_loop(fn, tuple(x.shape), noise=x, model_kwargs=kwargs, clip_denoised=True)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(args):
    """
    In a fresh process: one run of one variant; prints the peak resident memory it added over the loaded model.
    """
    _, scale, layers, model, diffusion, noise, kwargs = build(args)
    variants = make_variants(args, model, scale, layers)
    fn, backend, _ = variants[args.memory_probe]
    baseline = _status_kib("VmRSS")
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current resident size (Linux 4.0 or later).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    sample(diffusion, fn, backend, noise, kwargs, channels_last=args.memory_probe == EXTRAS["channels_last"])
    print(json.dumps({"peak_extra_mib": (_status_kib("VmHWM") - baseline) / 1024}))


def cpu_peak_memory(name, argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, os.path.abspath(__file__), *argv, "--memory_probe", name]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"memory probe for {name!r} failed:\n{result.stderr}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        th.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)

    device = th.device(args.device)
    # The samplers' precision policy (guided_diffusion/run/precision.py): TF32 off unless asked for.
    apply_precision_policy(allow_tf32=args.allow_tf32)
    flags, scale, layers, model, diffusion, noise, kwargs = build(args)
    variants = make_variants(args, model, scale, layers)
    times = {name: [] for name in variants}
    peaks = {name: None for name in variants}
    samples = {}

    def run(name):
        fn, backend, _ = variants[name]
        samples[name] = sample(diffusion, fn, backend, noise, kwargs, channels_last=name == EXTRAS["channels_last"])

    for _ in tqdm(range(args.warmup), desc="warmup", disable=not args.warmup):
        for name in variants:
            with on_device(variants[name][2], model, device):
                run(name)
    # Interleaved, so slow phases of a shared machine fall on every variant.
    for _ in tqdm(range(args.repeats), desc="timing"):
        for name in variants:
            with on_device(variants[name][2], model, device):
                if device.type == "cuda":
                    th.cuda.reset_peak_memory_stats(device)
                times[name].append(timed(lambda: run(name), device))
                peak = th.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
            if device.type == "cuda":
                peaks[name] = peak if peaks[name] is None else max(peaks[name], peak)
    if args.memory and device.type == "cpu":
        for name in tqdm(list(variants), desc="memory"):
            peaks[name] = cpu_peak_memory(name, argv)

    # Same noise, same model: the PAG variants must agree (up to the attention kernel's rounding).
    guided_gap = (samples[VARIANTS[3]] - samples[OFFICIAL]).abs().max().item()
    medians = {name: statistics.median(values) for name, values in times.items()}
    n_params = sum(p.numel() for p in model.parameters())
    precision = ("float16 torso" if args.use_fp16 else "float32") + (", TF32 allowed" if args.allow_tf32 else "")
    memory_what = "peak allocated (MiB)" if device.type == "cuda" else "peak RSS added (MiB)"
    print()
    print(
        f"ADM-256 architecture from {os.path.basename(args.config_path)} ({n_params / 1e6:.0f}M parameters, "
        f"num_channels {flags['num_channels']}, random weights), DDIM {args.steps} steps, PAG s={scale:g} on "
        f"{layers}; batch {args.batch_size}x3x{args.image_size}x{args.image_size}, {precision}, device "
        f"{_device_name(device)}, torch {th.__version__}, threads {th.get_num_threads()}; median of {args.repeats} "
        f"interleaved runs after {args.warmup} warmup"
    )
    print()
    print(f"| variant | s / run | samples / s | {memory_what} | time / ADM plain | speed-up vs official PAG |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, median in medians.items():
        peak = "n/a" if peaks[name] is None else f"{peaks[name]:.0f}"
        print(
            f"| {name} | {median:.2f} | {args.batch_size / median:.3f} | {peak} | "
            f"{median / medians[BASELINE]:.2f} | {medians[OFFICIAL] / median:.2f} |"
        )
    print()
    print(f"max |ours - official PAG| over the final samples: {guided_gap:.2e}")
    if args.output:
        write_json_atomic(
            args.output,
            {
                "args": {k: v for k, v in vars(args).items() if k != "memory_probe"},
                "flags": flags,
                "pag_scale": scale,
                "pag_layers": layers,
                "num_parameters": n_params,
                "device": _device_name(device),
                "torch": th.__version__,
                "seconds": times,
                "median_seconds": medians,
                "samples_per_second": {name: args.batch_size / m for name, m in medians.items()},
                "peak_memory_mib": peaks,
                "peak_memory_kind": memory_what,
                "max_abs_gap_ours_vs_official": guided_gap,
            },
        )


def _device_name(device):
    if device.type == "cuda":
        return f"cuda ({th.cuda.get_device_name(device)})"
    return "cpu"


if __name__ == "__main__":
    main()
