"""
The guidance flags of the sampling scripts, in one place.

A script adds every guidance method's flags with guidance_defaults(), checks them before loading anything with
check_guidance_args(args), and wraps its loaded model with guide_model(model, diffusion, args); it never names a
method's flags itself. Each method is a GuidanceFlags subclass below that declares its flags once (flags(): name,
default, help, choices, type, as flag_help.Flag), turns them into a small frozen spec once (spec(args): parsed and
checked with the method's own check functions), from which it checks the built model, wraps it and describes
itself; the method itself lives in its own module (PAG in pag.py, SAG in sag.py, autoguidance in autoguidance.py).
A new method is one more class here and one more entry in GUIDANCE_METHODS; a new flag of a method is one more
entry in its flags().

Every method's scale follows a schedule (schedules.py) given by the same three flags under the method's prefix X:
--X_schedule, --X_sigma_interval and --X_adaptive_a (declared once, by schedule_flags; parsed by ScheduleSpec),
beside --X_interval.
"""

import argparse
import os
import shlex
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .. import dist_util
from ..common import flag_help
from ..methods.autoguidance import AutoguidedModel
from ..methods.attention_layers import resolve_layers
from .checkpoints import load_for_sampling
from ..common.errors import UsageError
from .flag_files import expand_flag_files
from ..common.flag_help import Flag
from ..methods.guided_model import check_scale
from ..methods.pag import PAGGuidedModel
from ..methods.perturbations import PERTURBATIONS, make_perturbation
from ..methods.sag import OFFICIAL_SAG_BLUR_SIGMA, OFFICIAL_SAG_LAYER, SAGGuidedModel, SAGLayerError, check_blur_sigma
from ..methods.schedules import (
    SCHEDULE_KINDS,
    ScaleSchedule,
    check_adaptive_a,
    check_sigma_interval,
    model_timesteps,
    schedule_text,
)
from ..script_util import (
    add_dict_to_argparser,
    check_channel_flags,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


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


# --- the scale schedule: the same three flags under every method's prefix -----------------------------------------


def schedule_flags(prefix, group):
    """
    The schedule flags of the method whose flags start with `prefix`_ (see schedules.py), {name: Flag}: its shape,
    its sigma interval and the adaptive shape's a. The defaults give the constant scale.
    """
    return {
        f"{prefix}_schedule": Flag(
            group, f"how --{prefix}_scale s varies over the N sampled steps i = N-1 (noisiest) .. 0: constant; "
            "linear s i/(N-1); cosine s cos(pi/2 (N-1-i)/(N-1)); adaptive max(0, s - a (1000 - t)) with t the "
            f"step's timestep on a 0..1000 scale and a from --{prefix}_adaptive_a",
            default="constant", choices=SCHEDULE_KINDS,
        ),
        f"{prefix}_sigma_interval": Flag(
            group, "'lo,hi': guide only at steps with lo < sigma_t <= hi, sigma_t = sqrt((1 - alphabar_t) / "
            "alphabar_t) of the step's original timestep (hi may be inf); empty: every step", default="",
        ),
        f"{prefix}_adaptive_a": Flag(
            group, "adaptive only: the scale's fall per timestep, s_t = max(0, s - a (1000 - t))", default=None,
            type=float,
        ),
    }


def parse_sigma_interval(text, flag):
    """
    "" -> None (every step); "lo,hi" -> (lo, hi) with 0 <= lo < hi (hi may be inf; schedules.check_sigma_interval).
    """
    text = (text or "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    expected = "expected 'lo,hi' with numbers 0 <= lo < hi (hi may be inf), or '' for every step"
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"{flag} {text!r} is malformed: {expected}") from None
    try:
        return check_sigma_interval((lo, hi))
    except ValueError:
        raise UsageError(f"{flag} {text!r} is out of range: {expected}") from None


@dataclass(frozen=True)
class ScheduleSpec:
    """
    A method's schedule flags parsed: the shape (schedules.SCHEDULE_KINDS), the sigma interval, adaptive's a.
    """

    prefix: str
    kind: str
    sigma_interval: Optional[Tuple[float, float]]
    adaptive_a: Optional[float]

    @classmethod
    def parse(cls, flags, prefix, scale):
        kind = str(flags[f"{prefix}_schedule"]).strip()
        if kind not in SCHEDULE_KINDS:
            raise UsageError(f"--{prefix}_schedule {kind!r} is unknown; use one of {', '.join(SCHEDULE_KINDS)}")
        value = flags[f"{prefix}_adaptive_a"]
        text = "" if value is None else str(value).strip()
        adaptive_a = None
        if text:
            if kind != "adaptive":
                raise UsageError(f"--{prefix}_adaptive_a applies to --{prefix}_schedule adaptive only, not {kind!r}")
            try:
                adaptive_a = check_adaptive_a(text)
            except ValueError:
                raise UsageError(f"--{prefix}_adaptive_a must be a finite number >= 0, got {text!r}") from None
        elif kind == "adaptive":
            raise UsageError(
                f"--{prefix}_schedule adaptive needs --{prefix}_adaptive_a A (s_t = max(0, s - A (1000 - t)); "
                "diffusers' pag_adaptive_scale)"
            )
        if kind == "adaptive" and float(scale) < 0:
            raise UsageError(
                f"--{prefix}_schedule adaptive lowers the scale towards 0 and clamps it there, so it needs a "
                f"positive --{prefix}_scale, got {float(scale):g}"
            )
        sigma_interval = parse_sigma_interval(flags[f"{prefix}_sigma_interval"], f"--{prefix}_sigma_interval")
        return cls(prefix, kind, sigma_interval, adaptive_a)

    @property
    def constant(self):
        return self.kind == "constant" and self.sigma_interval is None

    def build(self, diffusion):
        """
        The schedules.ScaleSchedule for the diffusion the model is sampled with.
        """
        return ScaleSchedule(self.kind, diffusion, self.sigma_interval, self.adaptive_a)

    def describe(self):
        return schedule_text(self.kind, self.sigma_interval, self.adaptive_a)

    def check_guides(self, scale, interval, diffusion, t_range):
        """
        Refuse a schedule under which no sampled step is guided (the method would silently do nothing): the
        sigma interval holds none of the sampled steps, or adaptive's a is so large that s_t = 0 at all of them.
        """
        if self.constant:
            return
        scales = self.build(diffusion).step_scales(scale)
        if t_range is not None:
            steps = model_timesteps(diffusion).numpy()
            scales = scales * ((steps >= t_range[0]) & (steps <= t_range[1]))
        if (scales != 0).any():
            return
        flags = [f"--{self.prefix}_schedule {self.kind}"]
        if self.adaptive_a is not None:
            flags.append(f"--{self.prefix}_adaptive_a {self.adaptive_a:g}")
        if self.sigma_interval is not None:
            flags.append(f"--{self.prefix}_sigma_interval '{self.sigma_interval[0]:g},{self.sigma_interval[1]:g}'")
        if interval.interval is not None:
            flags.append(f"{interval.flag} '{interval.text}'")
        raise UsageError(
            f"{' with '.join(flags)} gives scale 0 at every one of the {diffusion.num_timesteps} sampled steps, so "
            "guidance would never act; widen the interval, lower the adaptive a or change --timestep_respacing"
        )


def describe_schedule(spec):
    """
    ", schedule ..." for a method's log line, "" for the constant scale.
    """
    return "" if spec.schedule.constant else f", schedule {spec.schedule.describe()}"


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

    def flags(self):
        """
        The method's flags, {name: flag_help.Flag}, in --help order; their defaults leave the method off.
        """
        raise NotImplementedError

    def defaults(self):
        """
        {flag: default} of the method's flags.
        """
        return {name: flag.default for name, flag in self.flags().items()}

    def spec(self, args):
        """
        The method's spec from the flags, or a UsageError for a bad value, before anything is loaded. The method's
        flags missing from args count as their defaults.
        """
        flags = {name: getattr(args, name, default) for name, default in self.defaults().items()}
        try:
            scale = check_scale(flags[self.switch], self.name)
        except ValueError:
            raise UsageError(
                f"--{self.switch} must be a finite number (0 turns {self.name} off), got {flags[self.switch]}"
            ) from None
        return self.spec_type(scale=scale, changed=self.changed_flags(args), **self.spec_fields(flags, args))

    def spec_fields(self, flags, args):
        """
        The spec's fields besides scale and changed, {field: value}, from the method's flags (a dict) and args.
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

    def checkpoints(self, spec):
        """
        {flag: what it holds} for the checkpoints the method loads besides the model's (resolved and recorded by
        the run like --model_path).
        """
        return {}


def perturbation_flags():
    """
    {param: (Param, kinds that take it)} for every perturbation parameter the PAG flags expose as --pag_<param>.
    """
    params = {}
    for kind, cls in PERTURBATIONS.items():
        for param in cls.params_declared:
            if param.flag:
                params.setdefault(param.name, (param, []))[1].append(kind)
    return params


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
    schedule: ScheduleSpec

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

    def flags(self):
        group = flag_help.PAG
        kinds = "; ".join(f"{kind} ({cls.summary})" for kind, cls in PERTURBATIONS.items())
        flags = {
            "pag_scale": Flag(group, "guidance scale s: eps + s (eps - eps_perturbed); 0 turns PAG off", default=0.0),
            "pag_layers": Flag(
                group, "attention blocks to perturb: comma-separated module names (middle_block.1) or aliases all, "
                "middle, input (encoder), output (decoder)", default="middle",
            ),
            "pag_interval": Flag(
                group, "'lo,hi': guide only at timesteps lo..hi of 0..--diffusion_steps - 1 (e.g. 0,499 for the "
                "last half); empty: every step", default="",
            ),
            "pag_perturbation": Flag(
                group, f"how the attention is perturbed: {kinds}", default="identity", choices=tuple(PERTURBATIONS)
            ),
        }
        # One flag per perturbation parameter; None (False for a switch): not given. Each applies to the kinds
        # that take it, and only to them.
        for name, (param, kinds) in perturbation_flags().items():
            switch = isinstance(param.default, bool)
            flags[f"pag_{name}"] = Flag(
                group, f"{param.help}; {' and '.join(kinds)} only", default=False if switch else None,
                type=None if switch else param.flag_type,
            )
        flags.update(schedule_flags("pag", group))
        return flags

    def spec_fields(self, flags, args):
        kind, params, perturbation = pag_perturbation(flags)
        return dict(
            layers=flags["pag_layers"],
            interval=IntervalSpec.parse(flags["pag_interval"], args, "--pag_interval"),
            kind=kind,
            params=params,
            perturbation=perturbation,
            schedule=ScheduleSpec.parse(flags, "pag", flags["pag_scale"]),
        )

    def check_model(self, spec, model, diffusion):
        try:
            names = resolve_layers(model, spec.layers)
        except ValueError as exc:
            raise UsageError(f"--pag_layers {spec.layers!r}: {exc}") from None
        if spec.enabled:
            modules = dict(model.named_modules())
            try:
                for name in names:
                    spec.perturbation.check_block(name, modules[name])
            except ValueError as exc:
                raise UsageError(f"--pag_perturbation {spec.kind}: {exc}") from None
        if spec.enabled:
            spec.interval.check_sampled(diffusion)
            spec.schedule.check_guides(spec.scale, spec.interval, diffusion, spec.t_range)

    def wrap(self, model, diffusion, spec):
        # The random kinds draw from each sample's own perturbation stream inside the run's batches
        # (random_streams.py), so no global seeding is needed for them.
        return PAGGuidedModel(
            model, scale=spec.scale, layers=spec.layers, t_range=spec.t_range, kind=spec.perturbation,
            schedule=spec.schedule.build(diffusion),
        )

    def describe(self, spec):
        text = f"PAG: scale {spec.scale}, layers {spec.layers!r}, interval {spec.interval.describe()}"
        if spec.kind != "identity":
            text += f", perturbation {spec.perturbation.describe()}"
        return text + describe_schedule(spec)


def pag_perturbation(flags):
    """
    (kind, parameters given, perturbation) from PAG's perturbation flags, checked by make_perturbation.
    """
    kind = flags["pag_perturbation"]
    if kind not in PERTURBATIONS:
        raise UsageError(f"--pag_perturbation {kind!r} is unknown; use one of {', '.join(PERTURBATIONS)}")
    declared = {param.name: param for param in PERTURBATIONS[kind].params_declared}
    params = {}
    for name, (param, kinds) in perturbation_flags().items():
        value = flags[f"pag_{name}"]
        if isinstance(param.default, bool):
            if not value:
                continue
        else:
            text = "" if value is None else str(value).strip()
            if not text:
                continue
            if param.flag_type is float:
                try:
                    value = float(text)
                except ValueError:
                    raise UsageError(f"--pag_{name} {text!r} is not a number") from None
            else:
                value = text
        if name not in declared:
            raise UsageError(f"--pag_{name} applies to --pag_perturbation {' or '.join(kinds)} only, not {kind!r}")
        params[name] = value
    for param in declared.values():
        if param.required and param.name not in params:
            raise UsageError(f"--pag_perturbation {kind} needs --pag_{param.name} ({param.help})")
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
    schedule: ScheduleSpec

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

    def flags(self):
        group = flag_help.SAG
        return {
            "sag_scale": Flag(
                group, "guidance scale s (the official --guide_scale is 1 + s); 0 turns SAG off", default=0.0
            ),
            "sag_layer": Flag(
                group, "the one attention block whose map selects the blurred regions (the official "
                "--sel_attn_block output --sel_attn_depth D is output_blocks.D.1)", default=OFFICIAL_SAG_LAYER,
            ),
            "sag_blur_sigma": Flag(
                group, "std of the Gaussian blur of the masked regions", default=OFFICIAL_SAG_BLUR_SIGMA
            ),
            "sag_interval": Flag(group, "'lo,hi' as --pag_interval; empty: every step", default=""),
            "sag_heads": Flag(
                group, "how the attention map is split into heads: num_heads (the official code: --num_heads "
                "heads), block (the block's own heads) or a positive count", default="num_heads",
            ),
            **schedule_flags("sag", group),
        }

    def spec_fields(self, flags, args):
        blur_sigma = flags["sag_blur_sigma"]
        try:
            check_blur_sigma(blur_sigma)
        except ValueError:
            raise UsageError(f"--sag_blur_sigma must be a finite number > 0, got {blur_sigma}") from None
        heads = sag_heads(flags["sag_heads"])
        if heads == "num_heads":
            map_heads = args.num_heads
        else:
            map_heads = None if heads == "block" else heads
        return dict(
            layer=flags["sag_layer"],
            blur_sigma=blur_sigma,
            interval=IntervalSpec.parse(flags["sag_interval"], args, "--sag_interval"),
            heads=flags["sag_heads"],
            map_heads=map_heads,
            clip_denoised=getattr(args, "clip_denoised", True),
            schedule=ScheduleSpec.parse(flags, "sag", flags["sag_scale"]),
        )

    def check_model(self, spec, model, diffusion):
        # The default layer is checked only when SAG is on: models without an attention block there (the digits
        # model, super-resolution models) must still run unguided with the default flags.
        if not spec.enabled and spec.layer == OFFICIAL_SAG_LAYER:
            return
        if spec.enabled:
            # The layer, heads and model are checked by SAGGuidedModel itself when guide_model wraps the model.
            spec.interval.check_sampled(diffusion)
            spec.schedule.check_guides(spec.scale, spec.interval, diffusion, spec.t_range)
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
                schedule=spec.schedule.build(diffusion),
            )
        except SAGLayerError as exc:
            raise UsageError(f"--sag_layer {spec.layer!r}: {exc.reason}") from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def describe(self, spec):
        return (
            f"SAG: scale {spec.scale}, layer {spec.layer!r}, blur sigma {spec.blur_sigma:g}, "
            f"heads {spec.heads}, interval {spec.interval.describe()}{describe_schedule(spec)}"
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


# --- autoguidance -------------------------------------------------------------------------------------------------

# The flags the guide must share with the main model: its inputs, and the diffusion whose timesteps it receives.
AG_SHARED_FLAGS = (
    "image_size",
    "large_size",
    "small_size",
    "class_cond",
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
)


@dataclass(frozen=True)
class AGSpec(GuidanceSpec):
    """
    Autoguidance's flags parsed: the guide's checkpoint, its --ag_model_flags text and the full set of
    architecture flags it gives (the main model's, overridden by --ag_model_flags), --ag_interval, the schedule.
    """

    model_path: str
    model_flags: str
    # {flag: value} for the guide's factory (script_util.create_model_and_diffusion or its super-resolution twin).
    guide_flags: dict
    super_res: bool
    interval: IntervalSpec
    schedule: ScheduleSpec

    @property
    def t_range(self):
        return self.interval.t_range


class AGFlags(GuidanceFlags):
    """
    Autoguidance (autoguidance.py): --ag_scale s (s = w - 1, w the paper's and EDM2's guidance weight),
    --ag_model_path (the guide's checkpoint), --ag_model_flags (the guide's architecture flags, a string or
    @FILE; default: the main model's), --ag_interval (as --pag_interval) and the schedule flags.
    """

    name = "autoguidance"
    switch = "ag_scale"
    spec_type = AGSpec

    def flags(self):
        group = flag_help.AG
        return {
            "ag_scale": Flag(
                group, "guidance scale s = w - 1 (w: the paper's and EDM2's weight): eps + s (eps - eps_guide); 0 "
                "turns autoguidance off", default=0.0,
            ),
            "ag_model_path": Flag(
                group, "the guide's checkpoint: a weaker model of the same kind (smaller, less trained)", default=""
            ),
            "ag_model_flags": Flag(
                group, "the guide's architecture flags, e.g. '--num_channels 64 --channel_mult 1,1,1', or @FILE; "
                "empty: the main model's flags", default="",
            ),
            "ag_interval": Flag(group, "'lo,hi' as --pag_interval; empty: every step", default=""),
            **schedule_flags("ag", group),
        }

    def spec_fields(self, flags, args):
        super_res = hasattr(args, "large_size")
        return dict(
            model_path=flags["ag_model_path"],
            model_flags=flags["ag_model_flags"],
            guide_flags=parse_guide_flags(flags["ag_model_flags"], args, super_res),
            super_res=super_res,
            interval=IntervalSpec.parse(flags["ag_interval"], args, "--ag_interval"),
            schedule=ScheduleSpec.parse(flags, "ag", flags["ag_scale"]),
        )

    def check_model(self, spec, model, diffusion):
        if spec.enabled:
            spec.interval.check_sampled(diffusion)
            spec.schedule.check_guides(spec.scale, spec.interval, diffusion, spec.t_range)

    def checkpoints(self, spec):
        return {"ag_model_path": "autoguidance guide model"} if spec.enabled else {}

    def wrap(self, model, diffusion, spec):
        guide = load_guide(spec)
        return AutoguidedModel(
            model, guide, scale=spec.scale, t_range=spec.t_range, schedule=spec.schedule.build(diffusion)
        )

    def describe(self, spec):
        flags = f", guide flags {spec.model_flags!r}" if spec.model_flags.strip() else ""
        # The file's name: the run record keeps its full path and digest.
        return (
            f"autoguidance: scale {spec.scale} (w = {1 + spec.scale:g}), guide {os.path.basename(spec.model_path)!r}"
            f"{flags}, "
            f"interval {spec.interval.describe()}{describe_schedule(spec)}"
        )


def guide_flag_defaults(super_res):
    """
    The factory flags of the guide's kind of model: ADM's model_and_diffusion_defaults, or its super-resolution
    twin's.
    """
    return sr_model_and_diffusion_defaults() if super_res else model_and_diffusion_defaults()


class _GuideFlagParser:
    """
    Parses --ag_model_flags with argparse, every complaint a UsageError naming --ag_model_flags.
    """

    def __init__(self, defaults):
        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise UsageError(f"--ag_model_flags: {message}")

        self.parser = Parser(prog="--ag_model_flags", add_help=False)
        add_dict_to_argparser(self.parser, defaults)

    def parse(self, tokens):
        args, unknown = self.parser.parse_known_args(tokens)
        if unknown:
            raise UsageError(
                f"--ag_model_flags: {' '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not the model's "
                "architecture flags (give the guide's model flags only, e.g. '--num_channels 64 "
                "--channel_mult 1,1,1' or @configs/NAME.cfg)"
            )
        return vars(args)


def parse_guide_flags(text, args, super_res):
    """
    The guide's factory flags: the main model's (from args), overridden by --ag_model_flags `text` (flags or
    @FILE). Refuses flags the guide must share with the main model (AG_SHARED_FLAGS) set to other values.
    """
    keys = guide_flag_defaults(super_res)
    main = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    text = (text or "").strip()
    if not text:
        return main
    try:
        tokens, _ = expand_flag_files(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"--ag_model_flags {text!r}: {exc}") from None
    guide = _GuideFlagParser(main).parse(tokens)
    for name in AG_SHARED_FLAGS:
        if name in main and guide[name] != main[name]:
            raise UsageError(
                f"--ag_model_flags gives --{name} {guide[name]}, the main model has {main[name]}: the guide takes "
                "the main model's inputs and timesteps, so it must share its image size, labels and diffusion"
            )
    return guide


def build_guide(spec):
    """
    The guide model (random weights) built from spec.guide_flags; a UsageError for flags the factory rejects.
    """
    flags = spec.guide_flags
    create = sr_create_model_and_diffusion if spec.super_res else create_model_and_diffusion
    try:
        check_channel_flags(argparse.Namespace(**flags), flags.keys())
        model, _ = create(**flags)
    except ValueError as exc:
        raise UsageError(f"--ag_model_flags: {exc}") from None
    return model


def load_guide(spec, device=None):
    """
    The guide built from its flags with --ag_model_path loaded into it (every rank together), on `device`
    (default: dist_util.dev()), in eval mode.
    """
    guide = build_guide(spec)
    try:
        return load_for_sampling(
            guide,
            spec.model_path,
            "--ag_model_path",
            "autoguidance guide model",
            spec.guide_flags.get("use_fp16", False),
            dist_util.dev() if device is None else device,
            flags=set(spec.guide_flags),
        )
    except UsageError as exc:
        lines = str(exc).splitlines()
        if len(lines) == 1 or "does not fit" not in lines[0]:
            raise
        # One line: which flags to look at, and that they go in --ag_model_flags (the detail is for the main model).
        built = (
            f"--ag_model_flags {spec.model_flags!r}" if spec.model_flags.strip()
            else "the main model's flags (--ag_model_flags is empty)"
        )
        hint = next((line for line in lines if line.startswith("Most likely wrong flag")), "")
        if " check " in hint and " against" in hint:
            hint = "; most likely wrong: " + hint.split(" check ", 1)[1].split(" against", 1)[0]
        else:
            hint = ""
        raise UsageError(
            f"--ag_model_path {spec.model_path!r} does not fit the guide built from {built}: give the flags the "
            f"guide was trained with in --ag_model_flags (flags or @FILE){hint}"
        ) from None


GUIDANCE_METHODS = (PAGFlags(), SAGFlags(), AGFlags())
for _method in GUIDANCE_METHODS:
    # --help and add_dict_to_argparser read the methods' flags from the one table.
    flag_help.declare(_method.flags())


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
    if "autoguidance" in enabled and len(enabled) > 1:
        others = [name for name in enabled if name != "autoguidance"]
        off = " ".join(f"--{name.lower()}_scale 0" for name in others)
        raise UsageError(
            f"--ag_scale cannot be combined with {' or '.join(f'--{n.lower()}_scale' for n in others)}: "
            "autoguidance contrasts the plain main model with its guide and does not guide an already guided "
            f"model; add {off} (now {', '.join(f'{enabled[n].scale:g}' for n in others)}, e.g. from a config such "
            "as the embedded default's) to sample with autoguidance alone (classifier guidance combines with it)"
        )
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
