"""
The help text, --help group, choices and value type of every command-line flag, in one table.

The defaults stay in script_util's ADM dicts (model_and_diffusion_defaults() and friends); add_dict_to_argparser
looks each flag up here, so `--help` explains ADM's flags in ADM's terms without changing a name or a default.
A flag whose default is None ("off") takes its value type from here. SCRIPT_HELP holds the few flags whose meaning
differs between scripts (e.g. --batch_size is per sampling pass in the samplers, per optimizer step in training).
"""

from typing import NamedTuple, Optional, Tuple

MODEL = "model (U-Net architecture; must match the checkpoint)"
DIFFUSION = "diffusion"
SAMPLING = "sampling"
PAG = "Perturbed-Attention Guidance (PAG; off unless --pag_scale is nonzero)"
SAG = "Self-Attention Guidance (SAG; off unless --sag_scale is nonzero)"
CLASSIFIER = "classifier"
OUTPUT = "output"
INPUT = "input"
TASK = "inverse problem (DPS)"
TRAINING = "training"

# The order groups appear in --help.
GROUP_ORDER = (INPUT, MODEL, DIFFUSION, SAMPLING, CLASSIFIER, PAG, SAG, TASK, TRAINING, OUTPUT)

# Enumerations, spelled here so this table needs no torch; tests/run/test_help.py holds them equal to the code's.
NOISE_SCHEDULES = ("linear", "cosine")
PAG_PERTURBATIONS = ("identity", "mask", "drop", "blur", "avgpool2d", "noise")
CLASSIFIER_POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
TASKS = ("gaussian_blur", "motion_blur", "super_resolution", "inpainting")
MASK_TYPES = ("box", "random", "extreme")
GRADIENT_THROUGH = ("plain", "guided")


class FlagHelp(NamedTuple):
    group: str
    help: str
    choices: Optional[Tuple] = None
    type: Optional[type] = None  # the value type of a flag whose default is None


FLAG_HELP = {
    # --- model (ADM's model_and_diffusion_defaults) ---
    "image_size": FlagHelp(MODEL, "height and width of the images, in pixels"),
    "num_channels": FlagHelp(
        MODEL, "base channel count of the U-Net; every level has it times its --channel_mult entry, which must "
        "be a multiple of 32 (GroupNorm's 32 groups)"
    ),
    "num_res_blocks": FlagHelp(MODEL, "residual blocks per resolution level"),
    "num_heads": FlagHelp(MODEL, "attention heads per attention block (when --num_head_channels is -1)"),
    "num_heads_upsample": FlagHelp(MODEL, "attention heads in the decoder; -1: the same as --num_heads"),
    "num_head_channels": FlagHelp(
        MODEL, "channels per attention head; -1: use a fixed head count (--num_heads) instead"
    ),
    "attention_resolutions": FlagHelp(
        MODEL, "comma-separated feature-map sizes that get attention blocks, e.g. 32,16,8"
    ),
    "channel_mult": FlagHelp(
        MODEL, "comma-separated channel multiplier per level, e.g. 1,1,2,2,4,4; empty: ADM's choice for "
        "--image_size (64, 128, 256, 512)"
    ),
    "dropout": FlagHelp(MODEL, "dropout rate in the residual blocks"),
    "class_cond": FlagHelp(MODEL, "class-conditional model (it has a label embedding; labels go in arr_1)"),
    "use_checkpoint": FlagHelp(MODEL, "gradient checkpointing: recompute activations to save memory"),
    "use_scale_shift_norm": FlagHelp(MODEL, "residual blocks condition on the timestep with FiLM-like scale-shift"),
    "resblock_updown": FlagHelp(MODEL, "residual blocks do the up- and downsampling"),
    "use_fp16": FlagHelp(MODEL, "run the model in float16"),
    "use_new_attention_order": FlagHelp(MODEL, "split qkv before the heads (the new attention order)"),
    "large_size": FlagHelp(MODEL, "output size of the super-resolution model, in pixels"),
    "small_size": FlagHelp(MODEL, "size of the low-resolution input images (--base_samples), in pixels"),
    "learn_sigma": FlagHelp(MODEL, "the model also outputs the variance (6 output channels instead of 3)"),
    # --- diffusion ---
    "diffusion_steps": FlagHelp(DIFFUSION, "number of diffusion steps T the model was trained with"),
    "noise_schedule": FlagHelp(DIFFUSION, "beta schedule", choices=NOISE_SCHEDULES),
    "timestep_respacing": FlagHelp(
        DIFFUSION, "which steps to sample: comma-separated step counts per equal section (250, or 10,15,20), "
        "'ddimN' for N evenly strided steps (ddim25), or empty for all --diffusion_steps"
    ),
    "use_kl": FlagHelp(DIFFUSION, "train with the variational bound (KL) loss"),
    "predict_xstart": FlagHelp(DIFFUSION, "the model predicts x_0 instead of the noise"),
    "rescale_timesteps": FlagHelp(DIFFUSION, "feed the model timesteps scaled to 0..1000"),
    "rescale_learned_sigmas": FlagHelp(DIFFUSION, "rescaled MSE loss for a learned variance"),
    # --- sampling (sampling_cli.sampling_defaults) ---
    "model_path": FlagHelp(INPUT, "the diffusion model checkpoint (.pt state dict)"),
    "clip_denoised": FlagHelp(SAMPLING, "clip the predicted x_0 to [-1, 1] at each step"),
    "num_samples": FlagHelp(SAMPLING, "number of samples to draw"),
    "batch_size": FlagHelp(
        SAMPLING, "samples per forward pass on each rank; another value gives the same samples up to rare "
        "one-level rounding differences (bit-identical at the same batch size and thread count)"
    ),
    "use_ddim": FlagHelp(SAMPLING, "sample with DDIM (eta 0) instead of ancestral sampling"),
    "seed": FlagHelp(SAMPLING, "seed of the per-sample random streams: sample i depends only on the seed and i"),
    "grid": FlagHelp(
        OUTPUT, "also write a grid image of the first samples (NAME.png or .jpg; a bare name goes into the "
        "output folder); empty: no grid"
    ),
    "compare": FlagHelp(
        OUTPUT, "also sample the same seeds without guidance (into baseline/ in the output folder) and write "
        "compare.png beside the samples: the first samples without guidance on the left, with it on the right"
    ),
    "shard": FlagHelp(
        SAMPLING, "i/n: sample only the i-th of n slices of the run's batches (0 <= i < n), as an independent, "
        "resumable job writing samples_..._shardIofN.npz; join the n shards with scripts/merge_shards.py"
    ),
    "allow_tf32": FlagHelp(
        SAMPLING, "allow TF32 (10-bit mantissa) in CUDA convolutions and matmuls: faster on Ampere and newer GPUs, "
        "but samples differ from float32 by a few levels"
    ),
    "deterministic": FlagHelp(
        SAMPLING, "use only deterministic CUDA kernels (torch.use_deterministic_algorithms), so reruns are "
        "bit-identical where PyTorch can provide it; slower"
    ),
    "overwrite": FlagHelp(
        OUTPUT, "True: remove a finished run's samples, record and grid in --out_dir and sample again (without it a "
        "finished run is reported complete and not resampled)"
    ),
    "out_dir": FlagHelp(
        OUTPUT, "output folder (rerun with the same one to resume); empty: $OPENAI_LOGDIR, else a fresh "
        "temporary folder"
    ),
    # --- PAG (guidance.PAGFlags) ---
    "pag_scale": FlagHelp(PAG, "guidance scale s: eps + s (eps - eps_perturbed); 0 turns PAG off"),
    "pag_layers": FlagHelp(
        PAG, "attention blocks to perturb: comma-separated module names (middle_block.1) or aliases all, "
        "middle, input (encoder), output (decoder)"
    ),
    "pag_interval": FlagHelp(
        PAG, "'lo,hi': guide only at timesteps lo..hi of 0..--diffusion_steps - 1 (e.g. 0,499 for the last "
        "half); empty: every step"
    ),
    "pag_perturbation": FlagHelp(
        PAG, "how the attention is perturbed: identity (the paper's PAG: the map becomes the identity) or "
        "an ablation", choices=PAG_PERTURBATIONS
    ),
    "pag_drop_rate": FlagHelp(
        PAG, "probability of masking (mask) or zeroing (drop) each attention weight; mask and drop only",
        type=float,
    ),
    "pag_retain_diag": FlagHelp(PAG, "mask only: never mask the diagonal of the attention map"),
    "pag_blur_sigma": FlagHelp(PAG, "std of the Gaussian blur of the attention map; blur only", type=float),
    "pag_noise_scale": FlagHelp(PAG, "std of the noise added to the attention map; noise only", type=float),
    # --- SAG (guidance.SAGFlags) ---
    "sag_scale": FlagHelp(SAG, "guidance scale s (the official --guide_scale is 1 + s); 0 turns SAG off"),
    "sag_layer": FlagHelp(
        SAG, "the one attention block whose map selects the blurred regions (the official --sel_attn_block "
        "output --sel_attn_depth D is output_blocks.D.1)"
    ),
    "sag_blur_sigma": FlagHelp(SAG, "std of the Gaussian blur of the masked regions"),
    "sag_interval": FlagHelp(SAG, "'lo,hi' as --pag_interval; empty: every step"),
    "sag_heads": FlagHelp(
        SAG, "how the attention map is split into heads: num_heads (the official code: --num_heads heads), "
        "block (the block's own heads) or a positive count"
    ),
    # --- classifier (ADM's classifier_defaults, classifier_sample.py) ---
    "classifier_path": FlagHelp(INPUT, "the noisy-image classifier checkpoint (.pt state dict)"),
    "classifier_scale": FlagHelp(CLASSIFIER, "classifier guidance scale: the gradient of log p(y|x_t) times it"),
    "classifier_use_fp16": FlagHelp(CLASSIFIER, "run the classifier in float16"),
    "classifier_width": FlagHelp(CLASSIFIER, "base channel count of the classifier (a multiple of 32)"),
    "classifier_depth": FlagHelp(CLASSIFIER, "residual blocks per resolution level of the classifier"),
    "classifier_attention_resolutions": FlagHelp(
        CLASSIFIER, "comma-separated feature-map sizes that get attention blocks in the classifier"
    ),
    "classifier_use_scale_shift_norm": FlagHelp(CLASSIFIER, "scale-shift timestep conditioning in the classifier"),
    "classifier_resblock_updown": FlagHelp(CLASSIFIER, "residual blocks do the downsampling in the classifier"),
    "classifier_pool": FlagHelp(CLASSIFIER, "how the classifier pools its last feature map", choices=CLASSIFIER_POOLS),
    "classifier_channel_mult": FlagHelp(
        CLASSIFIER, "comma-separated channel multiplier per level of the classifier; empty: ADM's choice for "
        "--image_size"
    ),
    "classifier_num_classes": FlagHelp(CLASSIFIER, "number of classes the classifier predicts (ImageNet: 1000)"),
    # --- super-resolution input ---
    "base_samples": FlagHelp(
        INPUT, "the .npz of low-resolution samples to upsample (arr_0 images, arr_1 labels for --class_cond)"
    ),
    # --- inverse problems (inverse_sample.py) ---
    "data_dir": FlagHelp(INPUT, "the training images: a folder (class = file name prefix before '_') or an .npz"),
    "task": FlagHelp(TASK, "the inverse problem to solve (required)", choices=TASKS),
    "kernel_size": FlagHelp(TASK, "blur kernel size in pixels (gaussian_blur, motion_blur)"),
    "intensity": FlagHelp(
        TASK, "blur strength: the Gaussian's std (default 3.0) or the motion blur's intensity (default 0.5)",
        type=float,
    ),
    "kernel_seed": FlagHelp(TASK, "seed of the random motion-blur kernel"),
    "kernel_path": FlagHelp(TASK, "motion_blur: a fixed kernel (.npy or grayscale image) instead of a random one"),
    "scale_factor": FlagHelp(TASK, "super_resolution: downsampling factor"),
    "mask_type": FlagHelp(TASK, "inpainting: the random mask's shape", choices=MASK_TYPES),
    "mask_len_range": FlagHelp(TASK, "inpainting, box masks: 'lo,hi' side length in pixels"),
    "mask_prob_range": FlagHelp(TASK, "inpainting, random masks: 'lo,hi' fraction of pixels masked"),
    "mask_margin": FlagHelp(TASK, "inpainting, box masks: 'h,w' margin the box keeps from the border"),
    "mask_path": FlagHelp(TASK, "inpainting: a fixed mask (.npy or grayscale image, 1 = keep) instead of random"),
    "sigma": FlagHelp(TASK, "std of the Gaussian measurement noise (images in [-1, 1])"),
    "dps_scale": FlagHelp(TASK, "DPS step size: each step moves x_t along the gradient of ||y - A(x_0)|| times this"),
    "gradient_through": FlagHelp(
        TASK, "which x_0 the measurement gradient flows through under PAG: plain (the unperturbed branch's, as in "
        "the authors' PSLD+PAG code) or guided (the PAG-guided one, an ablation)", choices=GRADIENT_THROUGH
    ),
    # --- training (image_train.py, classifier_train.py) ---
    "schedule_sampler": FlagHelp(TRAINING, "how training timesteps are drawn", choices=SCHEDULE_SAMPLERS),
    "lr": FlagHelp(TRAINING, "AdamW learning rate"),
    "weight_decay": FlagHelp(TRAINING, "AdamW weight decay"),
    "lr_anneal_steps": FlagHelp(
        TRAINING, "anneal the learning rate linearly to 0 over this many steps and stop; 0: never"
    ),
    "microbatch": FlagHelp(TRAINING, "split each batch into micro-batches of this size; -1: no split"),
    "ema_rate": FlagHelp(TRAINING, "comma-separated EMA decay rates, one EMA checkpoint each"),
    "log_interval": FlagHelp(TRAINING, "log the losses every this many steps"),
    "save_interval": FlagHelp(TRAINING, "save checkpoints every this many steps"),
    "resume_checkpoint": FlagHelp(TRAINING, "resume from this modelNNNNNN.pt (its optimizer and EMA files beside it)"),
    "fp16_scale_growth": FlagHelp(TRAINING, "growth of the float16 loss scale per step"),
    "random_flip": FlagHelp(TRAINING, "flip training images horizontally at random (turn off for digits, text)"),
    "val_data_dir": FlagHelp(INPUT, "validation images, same layout as --data_dir; empty: no validation"),
    "noised": FlagHelp(TRAINING, "train on noised images x_t at random timesteps (a guidance classifier)"),
    "iterations": FlagHelp(TRAINING, "number of training steps"),
    "anneal_lr": FlagHelp(TRAINING, "anneal the learning rate linearly to 0 over --iterations"),
    "eval_interval": FlagHelp(TRAINING, "evaluate on --val_data_dir every this many steps"),
}

# Flags whose meaning differs in some scripts: {script: {flag: FlagHelp}}.
SCRIPT_HELP = {
    "image_train": {
        "batch_size": FlagHelp(TRAINING, "training images per step on each rank"),
        "seed": FlagHelp(TRAINING, "seed of every random generator (plus the rank); -1: unseeded, as in ADM"),
    },
    "classifier_train": {
        "batch_size": FlagHelp(TRAINING, "training images per step on each rank"),
    },
    "inverse_sample": {
        "data_dir": FlagHelp(
            INPUT, "the ground-truth images: a folder of image files (sorted by path) or an .npz whose arr_0 "
            "holds uint8 NHWC images, at the model's size"
        ),
        "num_samples": FlagHelp(SAMPLING, "restore the first this many images; 0: all of --data_dir"),
        "grid": FlagHelp(
            OUTPUT, "grid image of measurement | reconstruction | ground truth rows; empty: no grid"
        ),
    },
}


def flag_help(name, script=None):
    """
    The FlagHelp of a flag (as the script uses it), or None for a flag the table does not know.
    """
    return SCRIPT_HELP.get(script, {}).get(name) or FLAG_HELP.get(name)
