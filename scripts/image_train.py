"""
Train a diffusion model on images.
"""

import random

import numpy as np
import torch as th

from guided_diffusion import dist_util, logger
from guided_diffusion.common import launch_env
from guided_diffusion.common.errors import check_training_data, exit_with_usage_error
from guided_diffusion.run.flag_files import FlagFileArgumentParser
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    check_channel_flags,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import TrainLoop


def main():
    parser = create_argparser()
    args = parser.parse_args()
    check_training_data(parser, args)
    try:
        check_channel_flags(args, model_and_diffusion_defaults().keys())
    except ValueError as exc:
        exit_with_usage_error(parser, exc)

    dist_util.setup_dist()
    logger.configure()
    if args.seed >= 0:
        seed_everything(args.seed)

    logger.log("creating model and diffusion...")
    model, diffusion = create_model_and_diffusion(
        **args_to_dict(args, model_and_diffusion_defaults().keys())
    )
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
    )

    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
    ).run_loop()


def seed_everything(seed):
    # Each rank gets its own stream; the schedule sampler draws from numpy, flips from `random`.

    seed = seed + launch_env.rank()
    random.seed(seed)
    np.random.seed(seed)
    th.manual_seed(seed)


def create_argparser():
    defaults = dict(
        data_dir="",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        random_flip=True,  # turn off for data where mirror images are wrong (digits, text)
        seed=-1,  # -1: unseeded, as in ADM
    )
    defaults.update(model_and_diffusion_defaults())
    parser = FlagFileArgumentParser(description=__doc__.strip())
    add_dict_to_argparser(parser, defaults, script="image_train")
    return parser


if __name__ == "__main__":
    main()
