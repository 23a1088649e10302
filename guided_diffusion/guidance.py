"""
The guidance flags of the sampling scripts, in one place.

A script adds every guidance method's flags with guidance_defaults(), checks them before loading anything with
check_guidance_args(args), and wraps its loaded model with guide_model(model, diffusion, args); it never names a
method's flags itself. Each method is a GuidanceFlags subclass below that knows its flags, their checks and how
to wrap a model; the method itself lives in its own module (PAG in pag.py, SAG in sag.py). A new method is one more class here
and one more entry in GUIDANCE_METHODS.
"""

import math

from .errors import UsageError


def parse_interval(text, diffusion_steps, flag):
    """
    "" -> None (every step); "lo,hi" -> (lo, hi), an inclusive range of the model's timesteps
    0 .. diffusion_steps - 1 (the original, un-respaced ones).
    """
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    expected = f"expected 'lo,hi' with integers 0 <= lo <= hi <= {diffusion_steps - 1} (--diffusion_steps - 1)"
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"{flag} {text!r} is malformed: {expected}, or '' for every step") from None
    if not 0 <= lo <= hi <= diffusion_steps - 1:
        raise UsageError(f"{flag} {text!r} is out of range: {expected}")
    return lo, hi


def sampled_timesteps(diffusion):
    """
    The original timesteps a (possibly respaced) diffusion visits, in increasing order.
    """
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is None:
        return list(range(diffusion.num_timesteps))
    return sorted(int(t) for t in timestep_map)


def check_interval_is_sampled(interval, diffusion, flag):
    """
    Refuse an interval that none of the sampled timesteps falls in: the method would silently do nothing.
    """
    if interval is None:
        return
    steps = sampled_timesteps(diffusion)
    lo, hi = interval
    if not any(lo <= t <= hi for t in steps):
        below = [t for t in steps if t < lo]
        above = [t for t in steps if t > hi]
        nearest = ", ".join(str(t) for t in (below[-1:] + above[:1]))
        raise UsageError(
            f"{flag} '{lo},{hi}' contains none of the {len(steps)} timesteps this respacing samples (nearest: "
            f"{nearest}), so guidance would never act; widen the interval or change --timestep_respacing"
        )


def model_time_range(interval, args):
    """
    An interval of original timesteps as the model sees them: with --rescale_timesteps the model is called with
    t * 1000 / diffusion_steps, not t.
    """
    if interval is None or not args.rescale_timesteps:
        return interval
    scale = 1000.0 / args.diffusion_steps
    return interval[0] * scale, interval[1] * scale


class GuidanceFlags:
    """
    One guidance method's flags. Subclasses set `name` and implement the methods below.
    """

    name = ""

    def defaults(self):
        """
        The method's flags and their defaults; the defaults leave the method off.
        """
        raise NotImplementedError

    def check(self, args):
        """
        Reject bad flag values before anything is loaded (UsageError).
        """

    def enabled(self, args):
        raise NotImplementedError

    def check_model(self, args, model, diffusion):
        """
        Reject flag values that do not fit the built model and its diffusion (e.g. a layer the model lacks, an
        interval no sampled step falls in), also when the method is off, so a typo never goes unnoticed.
        """

    def wrap(self, model, diffusion, args):
        """
        The model guided by this method (called only when enabled).
        """
        raise NotImplementedError

    def describe(self, args):
        """
        One line for the log.
        """
        raise NotImplementedError

    # The flag that turns the method on; its other flags act only when it is on.
    switch = ""

    def ignored(self, args):
        """
        "--flag value" for each of the method's flags given another value than its default while the method is
        off: those flags have no effect, which the scripts say rather than sample as if unguided in silence.
        """
        if self.enabled(args):
            return []
        return [
            f"--{name} {getattr(args, name)}"
            for name, default in self.defaults().items()
            if name != self.switch and getattr(args, name, default) != default
        ]


# PAG's perturbation parameters: flag suffix -> what it is, for messages.
PAG_PERTURBATION_FLAGS = {
    "drop_rate": "the probability of masking (mask) or zeroing (drop) each attention weight",
    "blur_sigma": "the std of the Gaussian blur of the attention map",
    "noise_scale": "the std of the noise added to the attention map",
}


class PAGFlags(GuidanceFlags):
    """
    Perturbed-Attention Guidance (pag.py): --pag_scale, --pag_layers, --pag_interval, and the perturbation of the
    paper's ablation (perturbations.py): --pag_perturbation KIND with --pag_drop_rate, --pag_retain_diag,
    --pag_blur_sigma, --pag_noise_scale.
    """

    name = "PAG"
    switch = "pag_scale"

    def defaults(self):
        return dict(
            pag_scale=0.0,
            pag_layers="middle",
            pag_interval="",
            pag_perturbation="identity",
            # None: not given. Each applies to the kinds that take it, and only to them.
            pag_drop_rate=None,
            pag_retain_diag=False,
            pag_blur_sigma=None,
            pag_noise_scale=None,
        )

    def check(self, args):
        check_pag_scale(args.pag_scale)
        parse_interval(args.pag_interval, args.diffusion_steps, "--pag_interval")
        self.perturbation(args)

    def perturbation(self, args):
        """
        The (kind, parameters) the perturbation flags ask for, checked.
        """
        from .perturbations import KINDS, make_perturbation

        kind = args.pag_perturbation
        if kind not in KINDS:
            raise UsageError(f"--pag_perturbation {kind!r} is unknown; use one of {', '.join(KINDS)}")
        required, optional = KINDS[kind]
        params = {}
        for name in PAG_PERTURBATION_FLAGS:
            value = getattr(args, f"pag_{name}")
            text = "" if value is None else str(value).strip()
            if not text:
                continue
            if name not in required:
                takers = [k for k, (req, _) in KINDS.items() if name in req]
                raise UsageError(
                    f"--pag_{name} applies to --pag_perturbation {' or '.join(takers)} only, not {kind!r}"
                )
            try:
                params[name] = float(text)
            except ValueError:
                raise UsageError(f"--pag_{name} {text!r} is not a number") from None
        if args.pag_retain_diag:
            if "retain_diag" not in optional:
                raise UsageError(f"--pag_retain_diag applies to --pag_perturbation mask only, not {kind!r}")
            params["retain_diag"] = True
        for name in required:
            if name not in params:
                raise UsageError(
                    f"--pag_perturbation {kind} needs --pag_{name} ({PAG_PERTURBATION_FLAGS[name]})"
                )
        try:
            make_perturbation(kind, **params)
        except ValueError as exc:
            raise UsageError(f"--pag_perturbation {kind}: {exc}") from None
        return kind, params

    def enabled(self, args):
        return args.pag_scale != 0

    def check_model(self, args, model, diffusion):
        from .pag import resolve_layers

        try:
            resolve_layers(model, args.pag_layers)
        except ValueError as exc:
            raise UsageError(f"--pag_layers {args.pag_layers!r}: {exc}") from None
        if self.enabled(args):
            interval = parse_interval(args.pag_interval, args.diffusion_steps, "--pag_interval")
            check_interval_is_sampled(interval, diffusion, "--pag_interval")

    def t_range(self, args):
        """
        The PAGGuidedModel t_range that --pag_interval asks for, in the timesteps the model sees.
        """
        return model_time_range(parse_interval(args.pag_interval, args.diffusion_steps, "--pag_interval"), args)

    def wrap(self, model, diffusion, args):
        from .pag import PAGGuidedModel

        # The random kinds draw from each sample's own perturbation stream inside the run's batches
        # (random_streams.py), so no global seeding is needed for them.
        kind, params = self.perturbation(args)
        return PAGGuidedModel(
            model, scale=args.pag_scale, layers=args.pag_layers, t_range=self.t_range(args), kind=kind, **params
        )

    def describe(self, args):
        from .perturbations import make_perturbation

        kind, params = self.perturbation(args)
        text = f"PAG: scale {args.pag_scale}, layers {args.pag_layers!r}, interval {args.pag_interval or 'all'}"
        if kind != "identity":
            text += f", perturbation {make_perturbation(kind, **params).describe()}"
        return text


def check_pag_scale(scale):
    if not math.isfinite(scale):
        raise UsageError(f"--pag_scale must be a finite number (0 turns PAG off), got {scale}")
    return scale


# --sag_heads values besides a count: the official code's choice (the model's --num_heads) and the block's own.
SAG_HEADS_CHOICES = ("num_heads", "block")


class SAGFlags(GuidanceFlags):
    """
    Self-Attention Guidance (sag.py): --sag_scale (the paper's s; the official --guide_scale is 1 + s),
    --sag_layer (one attention block; the official --sel_attn_block output --sel_attn_depth D is
    output_blocks.D.1), --sag_blur_sigma, --sag_interval (as --pag_interval), --sag_heads.
    """

    name = "SAG"
    switch = "sag_scale"

    def defaults(self):
        from .sag import OFFICIAL_SAG_BLUR_SIGMA, OFFICIAL_SAG_LAYER

        return dict(
            sag_scale=0.0,
            sag_layer=OFFICIAL_SAG_LAYER,
            sag_blur_sigma=OFFICIAL_SAG_BLUR_SIGMA,
            sag_interval="",
            sag_heads="num_heads",
        )

    def check(self, args):
        if not math.isfinite(args.sag_scale):
            raise UsageError(f"--sag_scale must be a finite number (0 turns SAG off), got {args.sag_scale}")
        if not (math.isfinite(args.sag_blur_sigma) and args.sag_blur_sigma > 0):
            raise UsageError(f"--sag_blur_sigma must be a finite number > 0, got {args.sag_blur_sigma}")
        parse_interval(args.sag_interval, args.diffusion_steps, "--sag_interval")
        self.map_heads_flag(args)
        if self.enabled(args) and args.pag_scale != 0:
            raise UsageError(
                "--sag_scale and --pag_scale cannot both be set: SAG reads the attention map of the plain model "
                f"and does not guide a PAG-guided one; add --pag_scale 0 (now {args.pag_scale:g}, e.g. from a config "
                "such as the embedded default's) to sample with SAG alone"
            )

    def map_heads_flag(self, args):
        """
        --sag_heads as SAGGuidedModel's map_heads before the model is known: "num_heads", "block" or a count.
        """
        text = str(args.sag_heads).strip()
        if text in SAG_HEADS_CHOICES:
            return text
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            raise UsageError(
                f"--sag_heads {text!r}: use 'num_heads' (the official code: the map split into --num_heads heads), "
                "'block' (the block's own heads) or a positive number of heads"
            )
        return count

    def map_heads(self, args):
        value = self.map_heads_flag(args)
        if value == "num_heads":
            return args.num_heads
        if value == "block":
            return None
        return value

    def enabled(self, args):
        return args.sag_scale != 0

    def check_model(self, args, model, diffusion):
        from .sag import OFFICIAL_SAG_LAYER

        # The default layer is checked only when SAG is on: models without an attention block there (the digits
        # model, super-resolution models) must still run unguided with the default flags.
        if not self.enabled(args) and args.sag_layer == OFFICIAL_SAG_LAYER:
            return
        if self.enabled(args):
            # The layer, heads and model are checked by SAGGuidedModel itself when guide_model wraps the model.
            interval = parse_interval(args.sag_interval, args.diffusion_steps, "--sag_interval")
            check_interval_is_sampled(interval, diffusion, "--sag_interval")
            return
        from .pag import resolve_layers

        try:
            names = resolve_layers(model, args.sag_layer)
        except ValueError as exc:
            raise UsageError(f"--sag_layer {args.sag_layer!r}: {exc}") from None
        if len(names) != 1:
            raise UsageError(f"--sag_layer {args.sag_layer!r} selects {len(names)} attention blocks; give one")

    def wrap(self, model, diffusion, args):
        from .sag import SAGGuidedModel

        t_range = model_time_range(parse_interval(args.sag_interval, args.diffusion_steps, "--sag_interval"), args)
        try:
            return SAGGuidedModel(
                model,
                diffusion,
                scale=args.sag_scale,
                layer=args.sag_layer,
                blur_sigma=args.sag_blur_sigma,
                map_heads=self.map_heads(args),
                t_range=t_range,
                clip_denoised=getattr(args, "clip_denoised", True),
            )
        except ValueError as exc:
            message = str(exc)
            if message.startswith("SAG layer: "):
                message = f"--sag_layer {args.sag_layer!r}: " + message[len("SAG layer: ") :]
            raise UsageError(message) from None

    def describe(self, args):
        return (
            f"SAG: scale {args.sag_scale}, layer {args.sag_layer!r}, blur sigma {args.sag_blur_sigma:g}, "
            f"heads {args.sag_heads}, interval {args.sag_interval or 'all'}"
        )


GUIDANCE_METHODS = (PAGFlags(), SAGFlags())


def guidance_defaults():
    """
    The flags of every guidance method, all off by default.
    """
    defaults = {}
    for method in GUIDANCE_METHODS:
        defaults.update(method.defaults())
    return defaults


def check_guidance_args(args):
    for method in GUIDANCE_METHODS:
        method.check(args)


def ignored_flags_warnings(args):
    """
    One line per guidance method that is off although some of its flags are given, naming them.
    """
    lines = []
    for method in GUIDANCE_METHODS:
        given = method.ignored(args)
        if given:
            lines.append(
                f"warning: {method.name} is off (--{method.switch} 0), so {' '.join(given)} "
                f"{'has' if len(given) == 1 else 'have'} no effect; give a nonzero --{method.switch} to use "
                f"{'it' if len(given) == 1 else 'them'}"
            )
    return lines


def describe_guidance(args):
    """
    One line naming the guidance the flags turn on, or saying that none is.
    """
    lines = [method.describe(args) for method in GUIDANCE_METHODS if method.enabled(args)]
    return "; ".join(lines) if lines else "no guidance"


def guide_model(model, diffusion, args, log=None):
    """
    Check the guidance flags against the built model and return the model wrapped by every enabled method (the
    model itself when none is). Call it before loading the checkpoint, so a bad layer name costs no load: the
    wrappers keep a reference to the model, not a copy.

    :param log: called with one line per enabled method.
    """
    for method in GUIDANCE_METHODS:
        method.check_model(args, model, diffusion)
    guided = model
    for method in GUIDANCE_METHODS:
        if method.enabled(args):
            guided = method.wrap(guided, diffusion, args)
            if log is not None:
                log(method.describe(args))
    return guided
