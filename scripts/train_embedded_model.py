"""
Reproduce the embedded default model (models/digits16.pt) from scratch.

Trains on the shipped digits dataset (datasets/digits16.npz, built from scikit-learn's digits by
scripts/make_digits_dataset.py; scikit-learn is not needed here) with scripts/image_train.py and
configs/digits16/digits16_train.cfg (fixed seed), then copies the final EMA weights to --out and writes a JSON record of the
run beside them (the flags it really ran with, the final logged loss). A progress bar follows the training log;
ADM's loss tables go to --work_dir's log.txt and progress.csv.
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

from tqdm.auto import tqdm

from guided_diffusion.common.atomic_io import atomic_write, write_json_atomic
from guided_diffusion.common.errors import REPO_ROOT as REPO
from guided_diffusion.run.flag_files import config_flags, config_path

TRAIN_CONFIG = config_path("digits16_train")
DATASET = os.path.join(REPO, "datasets", "digits16.npz")


def latest_checkpoint(work_dir):
    found = sorted(glob.glob(os.path.join(work_dir, "model[0-9]*.pt")))
    return found[-1] if found else ""


def last_logged(work_dir):
    """(steps done, loss) of the last row of the training's progress.csv (each row the mean over its log
    interval), or None before the first row. Read while training writes it, so a half-written row is skipped."""
    path = os.path.join(work_dir, "progress.csv")
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    for row in reversed(rows):
        try:
            return int(float(row["step"])) + 1, float(row["loss"])  # "step" is the 0-based index of the last step
        except (KeyError, TypeError, ValueError):
            continue
    return None


def final_loss(work_dir):
    logged = last_logged(work_dir)
    return None if logged is None else logged[1]


def log_interval_for(steps, configured):
    """
    The config's log interval, made small enough for about ten progress updates and a divisor of `steps`, so the
    last step is logged (ADM's loop logs every log_interval steps only) and the record gets the final loss.
    """
    interval = max(1, min(configured, steps // 10))
    while steps % interval:
        interval -= 1
    return interval


def train(command, env, work_dir, steps, resumed_at):
    """Run image_train.py, with a progress bar over its steps fed from its progress.csv. Returns its exit status."""
    proc = subprocess.Popen(command, env=env)
    with tqdm(total=steps, initial=resumed_at, desc="training", unit="step") as bar:
        while True:
            try:
                status = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                status = None
            logged = last_logged(work_dir)
            if logged is not None and logged[0] > bar.n:
                bar.set_postfix(loss=f"{logged[1]:.4f}", refresh=False)
                bar.update(logged[0] - bar.n)
            if status is not None:
                return status


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
    parser.add_argument(
        "--config",
        default=TRAIN_CONFIG,
        help="the training flags (default configs/digits16/digits16_train.cfg; configs/digits16/digits16_weak_train.cfg builds the "
        "autoguidance guide models/digits16_weak.pt)",
    )
    args = parser.parse_args()
    if not os.path.isfile(args.config):
        parser.error(f"--config {args.config!r}: no such file")
    if not os.path.isfile(args.data):
        parser.error(
            f"--data {args.data!r}: no such file; the digits dataset ships as {os.path.relpath(DATASET)} "
            "(rebuild it with `python scripts/make_digits_dataset.py`, which needs scikit-learn)"
        )

    os.makedirs(args.work_dir, exist_ok=True)
    data = args.data

    config = os.path.abspath(args.config)
    flags = config_flags(config)
    steps = args.steps or int(flags["lr_anneal_steps"])
    # The flags this run trains with, as the record states them: the config's, with the step count and the log
    # interval that --steps implies.
    flags.update(
        lr_anneal_steps=str(steps),
        log_interval=str(log_interval_for(steps, int(flags["log_interval"]))),
    )
    command = [sys.executable, os.path.join(REPO, "scripts", "image_train.py"), "@" + config,
               "--data_dir", data, "--lr_anneal_steps", flags["lr_anneal_steps"],
               "--log_interval", flags["log_interval"]]
    resume = latest_checkpoint(args.work_dir)
    resumed_at = 0
    if resume:
        command += ["--resume_checkpoint", resume]
        resumed_at = int(os.path.basename(resume)[len("model"):-len(".pt")])
        print(f"resuming from {resume}")
    print(f"training {steps} steps; log and loss tables in {os.path.join(args.work_dir, 'log.txt')}", flush=True)
    env = dict(os.environ, OPENAI_LOGDIR=args.work_dir, OPENAI_LOG_FORMAT="log,csv")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    status = train(command, env, args.work_dir, steps, min(resumed_at, steps))
    if status != 0:
        sys.exit(f"train_embedded_model.py: training stopped with exit status {status}; "
                 f"see {os.path.join(args.work_dir, 'log.txt')}")
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
        train_config=os.path.relpath(config, REPO),
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
