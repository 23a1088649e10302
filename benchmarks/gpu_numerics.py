"""
The CUDA numerics checks of benchmarks/gpu_check.sh, one JSON report:

  golden     the shared tiny reference models (../shared/adm_reference) on CUDA in float32 (TF32 off) and float16
             (ADM's --use_fp16), against the CPU goldens; float16 is set against the same conversion on the CPU.
  tf32       the embedded digits model sampled on the CPU and on CUDA with TF32 off and on: the share of uint8
             values that moved and by how many levels.
  ranks      the same run on CUDA as one process and as two torchrun ranks sharing the GPU, with --deterministic:
             bit-identical or not.

    python benchmarks/gpu_numerics.py --out report.json [--device cuda:0] [--skip ranks]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch as th

from guided_diffusion import script_util as su
from guided_diffusion.common.atomic_io import write_json_atomic
from guided_diffusion.run.precision import apply_precision_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get("ADM_REFERENCE_DIR", os.path.join(os.path.dirname(REPO), "shared", "adm_reference"))
CHECKS = ("golden", "tf32", "ranks")
# The embedded model, five steps, eight samples in batches of four.
TINY_RUN = ["--timestep_respacing", "5", "--num_samples", "8", "--batch_size", "4", "--seed", "1", "--grid", ""]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON report to write")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to skip: {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skip - set(CHECKS)
    if unknown:
        parser.error(f"unknown --skip {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if th.device(args.device).type != "cuda" or not th.cuda.is_available():
        parser.error(f"--device {args.device}: these checks need CUDA, which is not available here")
    return args


def _build(ref, kind):
    if kind == "unet":
        model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **ref["flags"]})
    else:
        flags = {**su.classifier_defaults(), **ref["flags"]}
        model = su.create_classifier(**{k: flags[k] for k in su.classifier_defaults()})
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def _forward(model, ref, device):
    kwargs = {k: v.to(device) for k, v in ref.get("model_kwargs", {}).items()}
    with th.no_grad():
        return model(ref["x"].to(device), ref["t"].to(device), **kwargs).float().cpu()


def golden(device):
    results = {}
    for name, kind in (("tiny_unet_a.pt", "unet"), ("tiny_classifier.pt", "classifier")):
        path = os.path.join(REFERENCE, name)
        if not os.path.exists(path):
            results[name] = {"skipped": f"{path} not found"}
            continue
        ref = th.load(path)
        expected = ref["out"].float()
        scale = expected.abs().max().item()
        fp32 = (_forward(_build(ref, kind).to(device), ref, device) - expected).abs().max().item()
        half_cuda, half_cpu = _build(ref, kind).to(device), _build(ref, kind)
        half_cuda.convert_to_fp16()
        half_cpu.convert_to_fp16()
        fp16 = (_forward(half_cuda, ref, device) - expected).abs().max().item()
        try:
            fp16_cpu = (_forward(half_cpu, ref, "cpu") - expected).abs().max().item()
        except (RuntimeError, NotImplementedError):
            fp16_cpu = None
        # float16 rounding (u = 2^-11) of the output's scale, doubled for the two precisions' different kernels;
        # the CPU's own float16 error sets the order where it exists.
        fp16_bound = 2 * max(fp16_cpu or 0.0, 2.0 ** -11 * scale)
        results[name] = {
            "max_abs_out": scale,
            "fp32_max_abs_err": fp32,
            "fp32_ok": fp32 < 1e-5,
            "fp16_max_abs_err": fp16,
            "fp16_cpu_max_abs_err": fp16_cpu,
            "fp16_bound": fp16_bound,
            "fp16_ok": fp16 <= fp16_bound,
        }
    return results


def _env(device, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    index = th.device(device).index
    if index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(index)
    env.update(extra)
    return env


def _sample(out_dir, env, flags=(), launcher=()):
    script = os.path.join(REPO, "scripts", "image_sample.py")
    command = [*launcher, *([] if launcher else [sys.executable]), script, *TINY_RUN, *flags, "--out_dir", out_dir]
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {res.stderr[-2000:]}")
    with np.load(os.path.join(out_dir, "samples_8x16x16x3.npz")) as data:
        return data["arr_0"]


def tf32(device, tmp):
    cpu = _sample(os.path.join(tmp, "cpu"), _env(device, CUDA_VISIBLE_DEVICES=""))
    results = {}
    for allow in (False, True):
        out = _sample(os.path.join(tmp, f"cuda_tf32_{allow}"), _env(device), ["--allow_tf32", str(allow)])
        diff = np.abs(out.astype(np.int32) - cpu.astype(np.int32))
        results[f"allow_tf32={allow}"] = {
            "share_of_uint8_values_moved": float((diff > 0).mean()),
            "max_levels_moved": int(diff.max()),
        }
    return results


def ranks(device, tmp):
    env = _env(device, GUIDED_DIFFUSION_SHARE_GPUS="1")
    flags = ["--deterministic", "True"]
    one = _sample(os.path.join(tmp, "one"), env, flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _sample(os.path.join(tmp, "two"), env, flags, launcher=torchrun)
    return {"bit_identical_1_vs_2_ranks": bool(np.array_equal(one, two)),
            "uint8_values_differing": int((one != two).sum())}


def main(argv=None):
    args = parse_args(argv)
    apply_precision_policy(allow_tf32=False)
    report = {"device": th.cuda.get_device_name(args.device), "torch": th.__version__,
              "cuda": th.version.cuda, "cudnn": th.backends.cudnn.version()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CHECKS:
            if name in args.skip:
                continue
            try:
                report[name] = golden(args.device) if name == "golden" else globals()[name](args.device, tmp)
            except Exception as exc:  # one failed check must not hide the others' figures
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, json.dumps(report[name], indent=1), flush=True)
    write_json_atomic(args.out, report)
    print(f"report in {args.out}")


if __name__ == "__main__":
    main()
