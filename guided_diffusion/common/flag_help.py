"""
Every command-line flag of the scripts, declared once: its --help group, help text, default, choices and the value
type of a None ("off") default.

ADM's defaults dicts (script_util.model_and_diffusion_defaults() and friends, the sampling flags, the scripts' own
flags) are read from this table with flag_defaults(names), so their values stay ADM's and live only here;
add_dict_to_argparser reads the help, choices and types from it. A guidance method declares its flags beside its
parsing (guidance.py) and registers them here with declare(), so --help, the defaults and the ignored-flag warnings
read one declaration. SCRIPT_FLAGS holds the few flags whose default or meaning differs between scripts (e.g.
--batch_size is per sampling pass in the samplers, per optimizer step in training).

Adding a flag is one entry: `"name": Flag(GROUP, "help", default=...)` (plus choices=... for an enumeration, and
type=... when the default is None).
"""

from typing import NamedTuple, Optional, Tuple

MODEL = "model (U-Net architecture; must match the checkpoint)"
DIFFUSION = "diffusion"
SAMPLING = "sampling"
PAG = "Perturbed-Attention Guidance (PAG; off unless --pag_scale is nonzero)"
SAG = "Self-Attention Guidance (SAG; off unless --sag_scale is nonzero)"
AG = "Autoguidance (a weaker model as the guide; off unless --ag_scale is nonzero)"
CLASSIFIER = "classifier"
OUTPUT = "output"
INPUT = "input"
TASK = "inverse problem (DPS)"
TRAINING = "training"

# The order groups appear in --help.
GROUP_ORDER = (INPUT, MODEL, DIFFUSION, SAMPLING, CLASSIFIER, PAG, SAG, AG, TASK, TRAINING, OUTPUT)

# Enumerations, spelled here so this table needs no torch; tests/run/test_help.py holds them equal to the code's.
NOISE_SCHEDULES = ("linear", "cosine")
CLASSIFIER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
TASKS = ("gaussian_blur", "motion_blur", "super_resolution", "inpainting")
MASK_TYPES = ("box", "random", "extreme")
GRADIENT_THROUGH = ("plain", "guided")


class Flag(NamedTuple):
    """
    One flag's declaration (its name is its key in FLAGS or in a method's flag table).
    """

    group: str
    help: str
    default: object
    choices: Optional[Tuple] = None
    # The value type when the default is None ("off"); otherwise the default's type (str2bool for a bool).
    type: Optional[type] = None


FLAGS = {
    # --- model (ADM's model_and_diffusion_defaults) ---
    "image_size": Flag(MODEL, "height and width of the images, in pixels", default=64),
    "num_channels": Flag(
        MODEL, "base channel count of the U-Net; every level has it times its --channel_mult entry, which must "
        "be a multiple of 32 (GroupNorm's 32 groups)", default=128,
    ),
    "num_res_blocks": Flag(MODEL, "residual blocks per resolution level", default=2),
    "num_heads": Flag(MODEL, "attention heads per attention block (when --num_head_channels is -1)", default=4),
    "num_heads_upsample": Flag(MODEL, "attention heads in the decoder; -1: the same as --num_heads", default=-1),
    "num_head_channels": Flag(
        MODEL, "channels per attention head; -1: use a fixed head count (--num_heads) instead", default=-1,
    ),
    "attention_resolutions": Flag(
        MODEL, "comma-separated feature-map sizes that get attention blocks, e.g. 32,16,8", default="16,8",
    ),
    "channel_mult": Flag(
        MODEL, "comma-separated channel multiplier per level, e.g. 1,1,2,2,4,4; empty: ADM's choice for "
        "--image_size (64, 128, 256, 512)", default="",
    ),
    "dropout": Flag(MODEL, "dropout rate in the residual blocks", default=0.0),
    "class_cond": Flag(MODEL, "class-conditional model (it has a label embedding; labels go in arr_1)", default=False),
    "use_checkpoint": Flag(MODEL, "gradient checkpointing: recompute activations to save memory", default=False),
    "use_scale_shift_norm": Flag(
        MODEL, "residual blocks condition on the timestep with FiLM-like scale-shift", default=True,
    ),
    "resblock_updown": Flag(MODEL, "residual blocks do the up- and downsampling", default=False),
    "use_fp16": Flag(MODEL, "run the model in float16", default=False),
    "use_new_attention_order": Flag(MODEL, "split qkv before the heads (the new attention order)", default=False),
    "large_size": Flag(MODEL, "output size of the super-resolution model, in pixels", default=256),
    "small_size": Flag(MODEL, "size of the low-resolution input images (--base_samples), in pixels", default=64),
    "learn_sigma": Flag(MODEL, "the model also outputs the variance (6 output channels instead of 3)", default=False),
    # --- diffusion ---
    "diffusion_steps": Flag(DIFFUSION, "number of diffusion steps T the model was trained with", default=1000),
    "noise_schedule": Flag(DIFFUSION, "beta schedule", choices=NOISE_SCHEDULES, default="linear"),
    "timestep_respacing": Flag(
        DIFFUSION, "which steps to sample: comma-separated step counts per equal section (250, or 10,15,20), "
        "'ddimN' for N evenly strided steps (ddim25), or empty for all --diffusion_steps", default="",
    ),
    "use_kl": Flag(DIFFUSION, "train with the variational bound (KL) loss", default=False),
    "predict_xstart": Flag(DIFFUSION, "the model predicts x_0 instead of the noise", default=False),
    "rescale_timesteps": Flag(DIFFUSION, "feed the model timesteps scaled to 0..1000", default=False),
    "rescale_learned_sigmas": Flag(DIFFUSION, "rescaled MSE loss for a learned variance", default=False),
    # --- sampling (sampling_cli.sampling_defaults) ---
    "model_path": Flag(INPUT, "the diffusion model checkpoint (.pt state dict)", default=""),
    "clip_denoised": Flag(SAMPLING, "clip the predicted x_0 to [-1, 1] at each step", default=True),
    "num_samples": Flag(SAMPLING, "number of samples to draw", default=10000),
    "batch_size": Flag(
        SAMPLING, "samples per forward pass on each rank; another value gives the same samples up to rare "
        "one-level rounding differences (bit-identical at the same batch size and thread count)", default=16,
    ),
    "use_ddim": Flag(SAMPLING, "sample with DDIM (eta 0) instead of ancestral sampling", default=False),
    "seed": Flag(SAMPLING, "seed of the per-sample random streams: sample i depends only on the seed and i", default=0),
    "grid": Flag(
        OUTPUT, "also write a grid image of the first samples (NAME.png or .jpg; a bare name goes into the "
        "output folder); empty: no grid", default="",
    ),
    "compare": Flag(
        OUTPUT, "also sample the same seeds without guidance (into baseline/ in the output folder) and write "
        "compare.png beside the samples: the first samples without guidance on the left, with it on the right",
        default=False,
    ),
    "shard": Flag(
        SAMPLING, "i/n: sample only the i-th of n slices of the run's batches (0 <= i < n), as an independent, "
        "resumable job writing samples_..._shardIofN.npz; join the n shards with scripts/merge_shards.py", default="",
    ),
    "allow_tf32": Flag(
        SAMPLING, "allow TF32 (10-bit mantissa) in CUDA convolutions and matmuls: faster on Ampere and newer GPUs, "
        "but samples differ from float32 by a few levels", default=False,
    ),
    "deterministic": Flag(
        SAMPLING, "use only deterministic CUDA kernels (torch.use_deterministic_algorithms), so reruns are "
        "bit-identical where PyTorch can provide it; slower", default=False,
    ),
    "overwrite": Flag(
        OUTPUT, "True: remove a finished run's samples, record and grid in --out_dir and sample again (without it a "
        "finished run is reported complete and not resampled)", default=False,
    ),
    "out_dir": Flag(
        OUTPUT, "output folder (rerun with the same one to resume); empty: $OPENAI_LOGDIR, else a fresh "
        "temporary folder", default="",
    ),
    # --- classifier (ADM's classifier_defaults, classifier_sample.py) ---
    "classifier_path": Flag(INPUT, "the noisy-image classifier checkpoint (.pt state dict)", default=""),
    "classifier_scale": Flag(
        CLASSIFIER, "classifier guidance scale: the gradient of log p(y|x_t) times it", default=1.0,
    ),
    "classifier_use_fp16": Flag(CLASSIFIER, "run the classifier in float16", default=False),
    "classifier_width": Flag(CLASSIFIER, "base channel count of the classifier (a multiple of 32)", default=128),
    "classifier_depth": Flag(CLASSIFIER, "residual blocks per resolution level of the classifier", default=2),
    "classifier_attention_resolutions": Flag(
        CLASSIFIER, "comma-separated feature-map sizes that get attention blocks in the classifier", default="32,16,8",
    ),
    "classifier_use_scale_shift_norm": Flag(
        CLASSIFIER, "scale-shift timestep conditioning in the classifier", default=True,
    ),
    "classifier_resblock_updown": Flag(
        CLASSIFIER, "residual blocks do the downsampling in the classifier", default=True,
    ),
    "classifier_pool": Flag(
        CLASSIFIER, "how the classifier pools its last feature map", choices=CLASSIFIER_POOLS, default="attention",
    ),
    "classifier_channel_mult": Flag(
        CLASSIFIER, "comma-separated channel multiplier per level of the classifier; empty: ADM's choice for "
        "--image_size", default="",
    ),
    "classifier_num_classes": Flag(
        CLASSIFIER, "number of classes the classifier predicts (ImageNet: 1000)", default=1000,
    ),
    # --- super-resolution input ---
    "base_samples": Flag(
        INPUT, "the .npz of low-resolution samples to upsample (arr_0 images, arr_1 labels for --class_cond)",
        default="",
    ),
    # --- inverse problems (inverse_sample.py) ---
    "data_dir": Flag(
        INPUT, "the training images: a folder (class = file name prefix before '_') or an .npz", default="",
    ),
    "task": Flag(TASK, "the inverse problem to solve (required)", choices=TASKS, default=""),
    "kernel_size": Flag(TASK, "blur kernel size in pixels (gaussian_blur, motion_blur)", default=61),
    "intensity": Flag(
        TASK, "blur strength: the Gaussian's std (default 3.0) or the motion blur's intensity (default 0.5)",
        type=float, default=None,
    ),
    "kernel_seed": Flag(TASK, "seed of the random motion-blur kernel", default=0),
    "kernel_path": Flag(
        TASK, "motion_blur: a fixed kernel (.npy or grayscale image) instead of a random one", default="",
    ),
    "scale_factor": Flag(TASK, "super_resolution: downsampling factor", default=4),
    "mask_type": Flag(TASK, "inpainting: the random mask's shape", choices=MASK_TYPES, default="box"),
    "mask_len_range": Flag(TASK, "inpainting, box masks: 'lo,hi' side length in pixels", default="128,129"),
    "mask_prob_range": Flag(TASK, "inpainting, random masks: 'lo,hi' fraction of pixels masked", default="0.3,0.7"),
    "mask_margin": Flag(TASK, "inpainting, box masks: 'h,w' margin the box keeps from the border", default="16,16"),
    "mask_path": Flag(
        TASK, "inpainting: a fixed mask (.npy or grayscale image, 1 = keep) instead of random", default="",
    ),
    "sigma": Flag(TASK, "std of the Gaussian measurement noise (images in [-1, 1])", default=0.05),
    "dps_scale": Flag(
        TASK, "DPS step size: each step moves x_t along the gradient of ||y - A(x_0)|| times this", default=1.0,
    ),
    "gradient_through": Flag(
        TASK, "which x_0 the measurement gradient flows through under PAG: plain (the unperturbed branch's, as in "
        "the authors' PSLD+PAG code) or guided (the PAG-guided one, an ablation)", choices=GRADIENT_THROUGH,
        default="plain",
    ),
    # --- training (image_train.py, classifier_train.py) ---
    "schedule_sampler": Flag(
        TRAINING, "how training timesteps are drawn", choices=SCHEDULE_SAMPLERS, default="uniform",
    ),
    "lr": Flag(TRAINING, "AdamW learning rate", default=0.0001),
    "weight_decay": Flag(TRAINING, "AdamW weight decay", default=0.0),
    "lr_anneal_steps": Flag(
        TRAINING, "anneal the learning rate linearly to 0 over this many steps and stop; 0: never", default=0,
    ),
    "microbatch": Flag(TRAINING, "split each batch into micro-batches of this size; -1: no split", default=-1),
    "ema_rate": Flag(TRAINING, "comma-separated EMA decay rates, one EMA checkpoint each", default="0.9999"),
    "log_interval": Flag(TRAINING, "log the losses every this many steps", default=10),
    "save_interval": Flag(TRAINING, "save checkpoints every this many steps", default=10000),
    "resume_checkpoint": Flag(
        TRAINING, "resume from this modelNNNNNN.pt (its optimizer and EMA files beside it)", default="",
    ),
    "fp16_scale_growth": Flag(TRAINING, "growth of the float16 loss scale per step", default=0.001),
    "random_flip": Flag(
        TRAINING, "flip training images horizontally at random (turn off for digits, text)", default=True,
    ),
    "val_data_dir": Flag(INPUT, "validation images, same layout as --data_dir; empty: no validation", default=""),
    "noised": Flag(TRAINING, "train on noised images x_t at random timesteps (a guidance classifier)", default=True),
    "iterations": Flag(TRAINING, "number of training steps", default=150000),
    "anneal_lr": Flag(TRAINING, "anneal the learning rate linearly to 0 over --iterations", default=False),
    "eval_interval": Flag(TRAINING, "evaluate on --val_data_dir every this many steps", default=5),
}

# Flags whose default or meaning differs in some scripts: {script: {flag: Flag}}.
SCRIPT_FLAGS = {
    "image_train": {
        "batch_size": Flag(TRAINING, "training images per step on each rank", default=1,
    ),
        "seed": Flag(TRAINING, "seed of every random generator (plus the rank); -1: unseeded, as in ADM", default=-1,
    ),
    },
    "classifier_train": {
        "batch_size": Flag(TRAINING, "training images per step on each rank", default=4,
    ),
        "lr": Flag(TRAINING, "AdamW learning rate", default=3e-4,
    ),
    },
    "inverse_sample": {
        "data_dir": Flag(
            INPUT, "the ground-truth images: a folder of image files (sorted by path) or an .npz whose arr_0 "
            "holds uint8 NHWC images, at the model's size", default="",
        ),
        "num_samples": Flag(SAMPLING, "restore the first this many images; 0: all of --data_dir", default=0,
    ),
        "grid": Flag(
            OUTPUT, "grid image of measurement | reconstruction | ground truth rows; empty: no grid",
            default="grid.png",
        ),
    },
}


def declare(flags):
    """
    Register a guidance method's flags ({name: Flag}) in FLAGS; declaring the same flag again is a no-op, a
    different declaration under a taken name an error.
    """
    for name, flag in flags.items():
        if FLAGS.setdefault(name, flag) != flag:
            raise ValueError(f"flag --{name} is declared twice, differently")


def flag_info(name, script=None):
    """
    The Flag of a flag as the script uses it, or None for a flag the table does not know.
    """
    return SCRIPT_FLAGS.get(script, {}).get(name) or FLAGS.get(name)


def flag_defaults(names, script=None):
    """
    {name: default} for the named flags, in their order, as the script uses them.
    """
    return {name: flag_info(name, script).default for name in names}
