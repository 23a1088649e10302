"""
Reproduce the embedded default model (models/digits16.pt) from scratch.

Trains on the shipped digits dataset (datasets/digits16.npz, built from scikit-learn's digits by
scripts/make_digits_dataset.py; scikit-learn is not needed here) with scripts/image_train.py and
configs/digits16/digits16_train.cfg (fixed seed), then copies the final EMA weights to --out and writes a JSON record of the
run beside them.
Rerunning the same command resumes from the last checkpoint in --work_dir.
"""

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from guided_diffusion.common.atomic_io import atomic_write, write_json_atomic
from guided_diffusion.common.errors import REPO_ROOT as REPO
from guided_diffusion.run.flag_files import config_flags, config_path

TRAIN_CONFIG = config_path("digits16_train")
DATASET = os.path.join(REPO, "datasets", "digits16.npz")


def latest_checkpoint(work_dir):
    found = sorted(glob.glob(os.path.join(work_dir, "model[0-9]*.pt")))
    return found[-1] if found else ""


def final_loss(work_dir):
    path = os.path.join(work_dir, "progress.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return float(rows[-1]["loss"]) if rows else None


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--work_dir", default=os.path.join(REPO, "results", "digits16_train"), help="training log and checkpoints (a rerun resumes from them)"
    )
    parser.add_argument(
        "--out", default=os.path.join(REPO, "models", "digits16.pt"), help="where the final EMA model goes"
    )
    parser.add_argument("--steps", type=int, default=None, help="override lr_anneal_steps (for a quick check)")
    parser.add_argument("--data", default=DATASET, help="training images (default: the shipped digits npz)")
    args = parser.parse_args()
    if not os.path.isfile(args.data):
        parser.error(
            f"--data {args.data!r}: no such file; the digits dataset ships as {os.path.relpath(DATASET)} "
            "(rebuild it with `python scripts/make_digits_dataset.py`, which needs scikit-learn)"
        )

    os.makedirs(args.work_dir, exist_ok=True)
    data = args.data

    flags = config_flags(TRAIN_CONFIG)
    steps = args.steps or int(flags["lr_anneal_steps"])
    command = [sys.executable, os.path.join(REPO, "scripts", "image_train.py"), "@" + TRAIN_CONFIG,
               "--data_dir", data, "--lr_anneal_steps", str(steps)]
    resume = latest_checkpoint(args.work_dir)
    if resume:
        command += ["--resume_checkpoint", resume]
        print(f"resuming from {resume}")
    env = dict(os.environ, OPENAI_LOGDIR=args.work_dir, OPENAI_LOG_FORMAT="stdout,log,csv")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    subprocess.run(command, env=env, check=True)
    wall = time.time() - start

    ema = os.path.join(args.work_dir, f"ema_{flags['ema_rate']}_{steps:06d}.pt")
    if not os.path.exists(ema):
        raise FileNotFoundError(f"training ended without {ema}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(ema, "rb") as src:
        atomic_write(args.out, lambda dst: shutil.copyfileobj(src, dst))

    record_path = os.path.splitext(args.out)[0] + ".json"
    record = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    # Wall time adds up over resumed runs.
    record.update(
        steps=steps,
        train_config=os.path.relpath(TRAIN_CONFIG, REPO),
        flags=flags,
        final_loss=final_loss(args.work_dir),
        wall_time_s=round(record.get("wall_time_s", 0) * bool(resume) + wall, 1),
        checkpoint=os.path.basename(args.out),
        torch_threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    )
    write_json_atomic(record_path, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
