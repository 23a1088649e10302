"""
Flag defaults and factories for models and diffusions, with ADM's names and defaults, so ADM's command lines work.
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from .common.flag_help import GROUP_ORDER, flag_help
from .respace import SpacedDiffusion, space_timesteps
from .unet import SuperResModel, UNetModel, EncoderUNetModel

NUM_CLASSES = 1000

# The channel multipliers ADM picks per resolution when --channel_mult is not given.
DEFAULT_CHANNEL_MULTS = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
CLASSIFIER_CHANNEL_MULTS = DEFAULT_CHANNEL_MULTS
SR_CHANNEL_MULTS = {
    512: (1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
}


def diffusion_defaults():
    """
    Defaults for image and classifier training.
    """
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """
    Defaults for classifier models.
    """
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        # Ours, for classifiers of other sizes and label sets (e.g. the 16x16 digits): "" and 1000 are ADM's.
        classifier_channel_mult="",
        classifier_num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults():
    """
    Defaults for image training.
    """
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
):
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def parse_channel_mult(channel_mult, image_size, defaults=DEFAULT_CHANNEL_MULTS, flag="--channel_mult"):
    """
    "1,2,2" -> (1, 2, 2); "" -> ADM's choice for image_size, or a clear error for a size it has no choice for.
    """
    if channel_mult:
        if isinstance(channel_mult, (tuple, list)):
            return tuple(channel_mult)
        try:
            return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(
                f"{flag} must be comma-separated numbers such as '1,2,2', got {channel_mult!r}"
            ) from None
    if image_size not in defaults:
        sizes = ", ".join(str(s) for s in sorted(defaults))
        raise ValueError(
            f"unsupported image size: {image_size}. Sizes with a built-in channel_mult: {sizes}; "
            f"for other sizes give {flag} explicitly (e.g. {flag} 1,2,2 for 32x32 or 16x16)"
        )
    return defaults[image_size]


def parse_attention_resolutions(attention_resolutions, image_size, flag="--attention_resolutions"):
    """
    "32,16,8" (feature-map sizes) -> the downsampling rates at which the U-Net puts attention.
    """
    attention_ds = []
    for res in str(attention_resolutions).split(","):
        res = res.strip()
        if not res:
            continue
        res = int(res)
        if res <= 0 or image_size % res:
            raise ValueError(
                f"attention resolution {res} does not divide image size {image_size} ({flag} "
                f"{attention_resolutions!r} for {image_size}x{image_size} images: give feature-map sizes that divide it)"
            )
        attention_ds.append(image_size // res)
    return tuple(attention_ds)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
):
    channel_mult = parse_channel_mult(channel_mult, image_size)
    attention_ds = parse_attention_resolutions(attention_resolutions, image_size)

    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    classifier_channel_mult="",
    classifier_num_classes=NUM_CLASSES,
):
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        classifier_channel_mult=classifier_channel_mult,
        classifier_num_classes=classifier_num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    classifier_channel_mult="",
    classifier_num_classes=NUM_CLASSES,
):
    channel_mult = parse_channel_mult(
        classifier_channel_mult, image_size, CLASSIFIER_CHANNEL_MULTS, flag="--classifier_channel_mult"
    )
    attention_ds = parse_attention_resolutions(
        classifier_attention_resolutions, image_size, flag="--classifier_attention_resolutions"
    )

    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=classifier_num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_ds,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults():
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    for k in res.copy().keys():
        if k not in arg_names:
            del res[k]
    return res


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
):
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
):
    _ = small_size  # the low-resolution input is resized to large_size, so only large_size shapes the net
    channel_mult = parse_channel_mult("", large_size, SR_CHANNEL_MULTS)
    attention_ds = parse_attention_resolutions(attention_resolutions, large_size)

    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if not learn_sigma:
        model_var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    else:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def check_channel_flags(args, keys):
    """
    Name the flag when the channel counts the flags give cannot be built (a ValueError), before torch fails on a
    layer without naming one: every level's width (the base width times its multiplier) feeds GroupNorm's 32
    groups and must split evenly into the attention heads. `keys` are the flags of the factory in use.
    """
    if "classifier_width" in keys:
        width_flag, size = "classifier_width", args.image_size
        mults = parse_channel_mult(
            args.classifier_channel_mult, size, CLASSIFIER_CHANNEL_MULTS, flag="--classifier_channel_mult"
        )
        mult_hint = " (and --classifier_channel_mult)"
        attention = parse_attention_resolutions(
            args.classifier_attention_resolutions, size, flag="--classifier_attention_resolutions"
        )
        heads = [("64-channel heads (fixed in ADM's classifier)", 64, True)]
    else:
        width_flag = "num_channels"
        if "large_size" in keys:
            size, mult_hint = args.large_size, f" (the multipliers are fixed by --large_size {args.large_size})"
            mults = parse_channel_mult("", size, SR_CHANNEL_MULTS, flag="--large_size")
        else:
            size, mult_hint = args.image_size, " (and --channel_mult)"
            mults = parse_channel_mult(args.channel_mult, size)
        attention = parse_attention_resolutions(args.attention_resolutions, size)
        if args.num_head_channels != -1:
            heads = [(f"--num_head_channels {args.num_head_channels}", args.num_head_channels, True)]
        else:
            heads = [(f"--num_heads {args.num_heads}", args.num_heads, False)]
            if args.num_heads_upsample != -1:
                heads.append((f"--num_heads_upsample {args.num_heads_upsample}", args.num_heads_upsample, False))
    width = getattr(args, width_flag)
    if width <= 0:
        raise ValueError(f"--{width_flag} must be positive, got {width}")
    for level, mult in enumerate(mults):
        channels = int(mult * width)
        if channels % 32:
            raise ValueError(
                f"--{width_flag} {width} does not fit the architecture: level {level} has {channels} channels "
                f"({width} x {mult}), which GroupNorm cannot split into its 32 groups; choose --{width_flag}"
                f"{mult_hint} so that every level's width is a multiple of 32"
            )
        if 2**level not in attention and level != len(mults) - 1:
            continue  # no attention at this level (the middle block, at the last level, always has some)
        for what, count, per_head in heads:
            if count <= 0 or channels % count:
                split = "into heads of" if per_head else "among"
                raise ValueError(
                    f"--{width_flag} {width} and {what} do not fit: the attention at level {level} has {channels} "
                    f"channels, which do not split evenly {split} {count}{' heads' if not per_head else ' channels'}"
                )


def add_dict_to_argparser(parser, default_dict, script=None):
    """
    One `--name` flag per entry, with the entry as its default (ADM's names and defaults), and its help text,
    --help group, choices and the type of a None ("off") default from flag_help.py (as `script` uses the flag).
    """
    groups = parser.__dict__.setdefault("_flag_help_groups", {})
    for k, v in default_dict.items():
        info = flag_help(k, script)
        v_type = type(v)
        if v is None:
            v_type = (info.type if info is not None else None) or str
        elif isinstance(v, bool):
            v_type = str2bool
        kwargs = dict(default=v, type=v_type, metavar="BOOL" if v_type is str2bool else _METAVARS.get(v_type, "VALUE"))
        target = parser
        if info is not None:
            # The value is filled in when --help is printed (a script may change it with set_defaults);
            # flag_files.HelpFormatter leaves out an empty one.
            kwargs["help"] = info.help + " (default: %(default)s)"
            if info.choices is not None:
                kwargs["choices"] = info.choices
                del kwargs["metavar"]  # argparse shows the choices instead
            if info.group not in groups:
                groups[info.group] = parser.add_argument_group(info.group)
            target = groups[info.group]
        target.add_argument(f"--{k}", **kwargs)
    # Show the groups in one order (input, model, diffusion, sampling, ..., output) whatever order they came in.
    rank = {title: i for i, title in enumerate(GROUP_ORDER)}
    parser._action_groups.sort(key=lambda group: rank.get(group.title, -1))


_METAVARS = {int: "N", float: "X"}


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """
    Parse yes/no style command-line values, so `--class_cond True` and `--class_cond false` both work.
    """
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif v.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError("boolean value expected")
