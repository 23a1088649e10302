"""
The guidance flags of the sampling scripts, in one place.

A script adds every guidance method's flags with guidance_defaults(), checks them before loading anything with
check_guidance_args(args), and wraps its loaded model with guide_model(model, diffusion, args); it never names a
method's flags itself. Each method is a GuidanceFlags subclass below that turns its flags into a small frozen spec
once (spec(args): parsed and checked), from which it checks the built model, wraps it and describes itself; the
method itself lives in its own module (PAG in pag.py, SAG in sag.py). A new method is one more class here and one
more entry in GUIDANCE_METHODS.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from ..common.errors import UsageError
from ..methods.attention_layers import resolve_layers
from ..methods.pag import PAGGuidedModel
from ..methods.perturbations import KINDS, make_perturbation
from ..methods.sag import OFFICIAL_SAG_BLUR_SIGMA, OFFICIAL_SAG_LAYER, SAGGuidedModel


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


@dataclass(frozen=True)
class IntervalSpec:
    """
    An --X_interval flag parsed: its text, the original timesteps it names, and the same as the model sees them.
    """

    flag: str
    text: str
    interval: Optional[Tuple[int, int]]
    t_range: Optional[Tuple[float, float]]

    @classmethod
    def parse(cls, text, args, flag):
        """
        The interval `text` of `flag`, for the --diffusion_steps and --rescale_timesteps of args.
        """
        interval = parse_interval(text, args.diffusion_steps, flag)
        t_range = model_time_range(interval, args)
        if t_range is not None:
            # The guided models hold their range as floats.
            t_range = (float(t_range[0]), float(t_range[1]))
        return cls(flag, text, interval, t_range)

    def check_sampled(self, diffusion):
        check_interval_is_sampled(self.interval, diffusion, self.flag)

    def describe(self):
        return self.text or "all"


@dataclass(frozen=True)
class GuidanceSpec:
    """
    What a method's flags ask for, parsed and checked once. `changed` is "--flag value" for each of the method's
    flags (its switch aside) given another value than its default.
    """

    scale: float
    changed: Tuple[str, ...]

    @property
    def enabled(self):
        return self.scale != 0


class GuidanceFlags:
    """
    One guidance method's flags. Subclasses set `name` and `switch` (the flag that turns the method on; its other
    flags act only when it is on) and implement the methods below.
    """

    name = ""
    switch = ""
    # The method's GuidanceSpec subclass.
    spec_type = GuidanceSpec

    def defaults(self):
        """
        The method's flags and their defaults; the defaults leave the method off.
        """
        raise NotImplementedError

    def spec(self, args):
        """
        The method's spec from the flags, or a UsageError for a bad value, before anything is loaded. The method's
        flags missing from args count as their defaults.
        """
        flags = {name: getattr(args, name, default) for name, default in self.defaults().items()}
        scale = flags[self.switch]
        if not math.isfinite(scale):
            raise UsageError(f"--{self.switch} must be a finite number (0 turns {self.name} off), got {scale}")
        return self.spec_type(scale, self.changed_flags(args), *self.spec_fields(flags, args))

    def spec_fields(self, flags, args):
        """
        The spec's fields after scale and changed, in spec_type's order, from the method's flags (a dict) and args.
        """
        raise NotImplementedError

    def check_model(self, spec, model, diffusion):
        """
        Reject flag values that do not fit the built model and its diffusion (e.g. a layer the model lacks, an
        interval no sampled step falls in), also when the method is off, so a typo never goes unnoticed.
        """

    def wrap(self, model, diffusion, spec):
        """
        The model guided by this method (called only when enabled).
        """
        raise NotImplementedError

    def describe(self, spec):
        """
        One line for the log.
        """
        raise NotImplementedError

    def changed_flags(self, args):
        """
        "--flag value" for each of the method's flags but the switch that is given another value than its default.
        """
        return tuple(
            f"--{name} {getattr(args, name)}"
            for name, default in self.defaults().items()
            if name != self.switch and getattr(args, name, default) != default
        )

    def ignored(self, spec):
        """
        The changed flags while the method is off: those flags have no effect, which the scripts say rather than
        sample as if unguided in silence.
        """
        return [] if spec.enabled else list(spec.changed)


# PAG's perturbation parameters: flag suffix -> what it is, for messages.
PAG_PERTURBATION_FLAGS = {
    "drop_rate": "the probability of masking (mask) or zeroing (drop) each attention weight",
    "blur_sigma": "the std of the Gaussian blur of the attention map",
    "noise_scale": "the std of the noise added to the attention map",
}


@dataclass(frozen=True)
class PAGSpec(GuidanceSpec):
    """
    PAG's flags parsed: --pag_layers as given (the model resolves it), --pag_interval, the perturbation.
    """

    layers: str
    interval: IntervalSpec
    kind: str
    # The perturbation parameters the flags give (the kind's defaults are not filled in).
    params: dict
    # The perturbations.AttentionPerturbation built from kind and params.
    perturbation: object

    @property
    def t_range(self):
        """
        The PAGGuidedModel t_range that --pag_interval asks for, in the timesteps the model sees.
        """
        return self.interval.t_range


class PAGFlags(GuidanceFlags):
    """
    Perturbed-Attention Guidance (pag.py): --pag_scale, --pag_layers, --pag_interval, and the perturbation of the
    paper's ablation (perturbations.py): --pag_perturbation KIND with --pag_drop_rate, --pag_retain_diag,
    --pag_blur_sigma, --pag_noise_scale.
    """

    name = "PAG"
    switch = "pag_scale"
    spec_type = PAGSpec

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

    def spec_fields(self, flags, args):
        interval = IntervalSpec.parse(flags["pag_interval"], args, "--pag_interval")
        kind, params, perturbation = pag_perturbation(flags)
        return flags["pag_layers"], interval, kind, params, perturbation

    def check_model(self, spec, model, diffusion):
        try:
            resolve_layers(model, spec.layers)
        except ValueError as exc:
            raise UsageError(f"--pag_layers {spec.layers!r}: {exc}") from None
        if spec.enabled:
            spec.interval.check_sampled(diffusion)

    def wrap(self, model, diffusion, spec):
        # The random kinds draw from each sample's own perturbation stream inside the run's batches
        # (random_streams.py), so no global seeding is needed for them.
        return PAGGuidedModel(
            model, scale=spec.scale, layers=spec.layers, t_range=spec.t_range, kind=spec.perturbation, validated=True
        )

    def describe(self, spec):
        text = f"PAG: scale {spec.scale}, layers {spec.layers!r}, interval {spec.interval.describe()}"
        if spec.kind != "identity":
            text += f", perturbation {spec.perturbation.describe()}"
        return text


def pag_perturbation(flags):
    """
    (kind, parameters given, perturbation) from PAG's perturbation flags, checked.
    """
    kind = flags["pag_perturbation"]
    if kind not in KINDS:
        raise UsageError(f"--pag_perturbation {kind!r} is unknown; use one of {', '.join(KINDS)}")
    required, optional = KINDS[kind]
    params = {}
    for name in PAG_PERTURBATION_FLAGS:
        value = flags[f"pag_{name}"]
        text = "" if value is None else str(value).strip()
        if not text:
            continue
        if name not in required:
            takers = [k for k, (req, _) in KINDS.items() if name in req]
            raise UsageError(f"--pag_{name} applies to --pag_perturbation {' or '.join(takers)} only, not {kind!r}")
        try:
            params[name] = float(text)
        except ValueError:
            raise UsageError(f"--pag_{name} {text!r} is not a number") from None
    if flags["pag_retain_diag"]:
        if "retain_diag" not in optional:
            raise UsageError(f"--pag_retain_diag applies to --pag_perturbation mask only, not {kind!r}")
        params["retain_diag"] = True
    for name in required:
        if name not in params:
            raise UsageError(f"--pag_perturbation {kind} needs --pag_{name} ({PAG_PERTURBATION_FLAGS[name]})")
    try:
        perturbation = make_perturbation(kind, **params)
    except ValueError as exc:
        raise UsageError(f"--pag_perturbation {kind}: {exc}") from None
    return kind, params, perturbation


# --sag_heads values besides a count: the official code's choice (the model's --num_heads) and the block's own.
SAG_HEADS_CHOICES = ("num_heads", "block")


@dataclass(frozen=True)
class SAGSpec(GuidanceSpec):
    """
    SAG's flags parsed: --sag_layer as given (the model resolves it), --sag_blur_sigma, --sag_interval, the heads.
    """

    layer: str
    blur_sigma: float
    interval: IntervalSpec
    # The --sag_heads text, and SAGGuidedModel's map_heads from it: a count or None (the block's own).
    heads: str
    map_heads: Union[int, None]
    clip_denoised: bool

    @property
    def t_range(self):
        return self.interval.t_range


class SAGFlags(GuidanceFlags):
    """
    Self-Attention Guidance (sag.py): --sag_scale (the paper's s; the official --guide_scale is 1 + s),
    --sag_layer (one attention block; the official --sel_attn_block output --sel_attn_depth D is
    output_blocks.D.1), --sag_blur_sigma, --sag_interval (as --pag_interval), --sag_heads.
    """

    name = "SAG"
    switch = "sag_scale"
    spec_type = SAGSpec

    def defaults(self):
        return dict(
            sag_scale=0.0,
            sag_layer=OFFICIAL_SAG_LAYER,
            sag_blur_sigma=OFFICIAL_SAG_BLUR_SIGMA,
            sag_interval="",
            sag_heads="num_heads",
        )

    def spec_fields(self, flags, args):
        blur_sigma = flags["sag_blur_sigma"]
        if not (math.isfinite(blur_sigma) and blur_sigma > 0):
            raise UsageError(f"--sag_blur_sigma must be a finite number > 0, got {blur_sigma}")
        interval = IntervalSpec.parse(flags["sag_interval"], args, "--sag_interval")
        heads = sag_heads(flags["sag_heads"])
        if heads == "num_heads":
            map_heads = args.num_heads
        else:
            map_heads = None if heads == "block" else heads
        clip_denoised = getattr(args, "clip_denoised", True)
        return flags["sag_layer"], blur_sigma, interval, flags["sag_heads"], map_heads, clip_denoised

    def check_model(self, spec, model, diffusion):
        # The default layer is checked only when SAG is on: models without an attention block there (the digits
        # model, super-resolution models) must still run unguided with the default flags.
        if not spec.enabled and spec.layer == OFFICIAL_SAG_LAYER:
            return
        if spec.enabled:
            # The layer, heads and model are checked by SAGGuidedModel itself when guide_model wraps the model.
            spec.interval.check_sampled(diffusion)
            return
        try:
            names = resolve_layers(model, spec.layer)
        except ValueError as exc:
            raise UsageError(f"--sag_layer {spec.layer!r}: {exc}") from None
        if len(names) != 1:
            raise UsageError(f"--sag_layer {spec.layer!r} selects {len(names)} attention blocks; give one")

    def wrap(self, model, diffusion, spec):
        try:
            return SAGGuidedModel(
                model,
                diffusion,
                scale=spec.scale,
                layer=spec.layer,
                blur_sigma=spec.blur_sigma,
                map_heads=spec.map_heads,
                t_range=spec.t_range,
                clip_denoised=spec.clip_denoised,
                validated=True,
            )
        except ValueError as exc:
            message = str(exc)
            if message.startswith("SAG layer: "):
                message = f"--sag_layer {spec.layer!r}: " + message[len("SAG layer: ") :]
            raise UsageError(message) from None

    def describe(self, spec):
        return (
            f"SAG: scale {spec.scale}, layer {spec.layer!r}, blur sigma {spec.blur_sigma:g}, "
            f"heads {spec.heads}, interval {spec.interval.describe()}"
        )


def sag_heads(value):
    """
    --sag_heads as "num_heads", "block" or a count, before the model is known.
    """
    text = str(value).strip()
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


GUIDANCE_METHODS = (PAGFlags(), SAGFlags())


def guidance_defaults():
    """
    The flags of every guidance method, all off by default.
    """
    defaults = {}
    for method in GUIDANCE_METHODS:
        defaults.update(method.defaults())
    return defaults


def guidance_specs(args):
    """
    [(method, spec)] for every guidance method, the flags parsed and checked once (UsageError).
    """
    return [(method, method.spec(args)) for method in GUIDANCE_METHODS]


def check_guidance_args(args):
    """
    Reject bad guidance flags before anything is loaded (UsageError); return guidance_specs(args).
    """
    specs = guidance_specs(args)
    enabled = {method.name: spec for method, spec in specs if spec.enabled}
    if "SAG" in enabled and "PAG" in enabled:
        raise UsageError(
            "--sag_scale and --pag_scale cannot both be set: SAG reads the attention map of the plain model "
            f"and does not guide a PAG-guided one; add --pag_scale 0 (now {enabled['PAG'].scale:g}, e.g. from a "
            "config such as the embedded default's) to sample with SAG alone"
        )
    return specs


def ignored_flags_warnings(args):
    """
    One line per guidance method that is off although some of its flags are given, naming them.
    """
    lines = []
    for method, spec in guidance_specs(args):
        given = method.ignored(spec)
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
    lines = [method.describe(spec) for method, spec in guidance_specs(args) if spec.enabled]
    return "; ".join(lines) if lines else "no guidance"


def guide_model(model, diffusion, args, log=None):
    """
    Check the guidance flags against the built model and return the model wrapped by every enabled method (the
    model itself when none is). Call it before loading the checkpoint, so a bad layer name costs no load: the
    wrappers keep a reference to the model, not a copy.

    :param log: called with one line per enabled method.
    """
    specs = guidance_specs(args)
    for method, spec in specs:
        method.check_model(spec, model, diffusion)
    guided = model
    for method, spec in specs:
        if spec.enabled:
            guided = method.wrap(guided, diffusion, spec)
            if log is not None:
                log(method.describe(spec))
    return guided
