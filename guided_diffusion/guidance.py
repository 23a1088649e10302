"""
The guidance flags of the sampling scripts, in one place.

A script adds every guidance method's flags with guidance_defaults(), checks them before loading anything with
check_guidance_args(args), and wraps its loaded model with guide_model(model, diffusion, args); it never names a
method's flags itself. Each method is a GuidanceFlags subclass below that knows its flags, their checks and how
to wrap a model; the method itself lives in its own module (PAG in pag.py). A new method is one more class here
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


class PAGFlags(GuidanceFlags):
    """
    Perturbed-Attention Guidance (pag.py): --pag_scale, --pag_layers, --pag_interval.
    """

    name = "PAG"

    def defaults(self):
        return dict(pag_scale=0.0, pag_layers="middle", pag_interval="")

    def check(self, args):
        check_pag_scale(args.pag_scale)
        parse_interval(args.pag_interval, args.diffusion_steps, "--pag_interval")

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

        return PAGGuidedModel(model, scale=args.pag_scale, layers=args.pag_layers, t_range=self.t_range(args))

    def describe(self, args):
        return f"PAG: scale {args.pag_scale}, layers {args.pag_layers!r}, interval {args.pag_interval or 'all'}"


def check_pag_scale(scale):
    if not math.isfinite(scale) or scale < 0:
        raise UsageError(f"--pag_scale must be a finite number >= 0 (0 turns PAG off), got {scale}")
    return scale


GUIDANCE_METHODS = (PAGFlags(),)


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
