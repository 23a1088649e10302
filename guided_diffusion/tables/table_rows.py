"""
Table rows: the row configs scripts/reproduce.py runs, their header metadata and published figures, choosing
them by name or glob, and the labels the table gives a row's flags.

A table row is a flag file (configs/NAME.cfg) whose leading comment block carries `# key: value` lines:

    # script: image_sample.py          the sampling script the flags are for (required)
    # title: ADM ImageNet 256, ...     a human-readable description (default: the config name)
    # model: 256x256_diffusion.pt      the checkpoint file the user supplies
    # model_source: ...                where that file comes from (quoted in the missing-file message)
    # ref_batch: datasets/REF.npz      the reference batch, relative to the repository root (marks a row)
    # ref_batch_source: ...            where that file comes from
    # feature_net: inception           the evaluator's --feature_net (default: inception)
    # published: FID=1.0, IS=2.0, ...  figures from the paper, only those it prints
    # source: Table N of arXiv ...     where the published figures come from

Flag files without a `# ref_batch:` line (shared bases such as adm256_model.cfg) are not rows: a glob skips them.
"""

import fnmatch
import json
import math
import os

from ..run.flag_files import CONFIG_DIR, available_configs, config_path, config_paths, resolve_config, suggest_names
from ..run.guidance import describe_guidance

METADATA_KEYS = (
    "script",
    "title",
    "model",
    "model_source",
    "ref_batch",
    "ref_batch_source",
    "feature_net",
    "published",
    "source",
)

# (key in metrics.json, label in `# published:` lines and in the table, digits shown)
METRICS = (
    ("inception_score", "IS", 2),
    ("fid", "FID", 2),
    ("sfid", "sFID", 2),
    ("precision", "Precision", 3),
    ("recall", "Recall", 3),
    # Unbiased at any N, unlike FID, so small toy runs compare fairly.
    ("kid_mean", "KID", 4),
)

# The figures of inverse-problem rows (inverse_sample.py): reconstructions against their own ground truth.
RESTORATION_METRICS = (
    ("psnr", "PSNR", 2),
    ("ssim", "SSIM", 3),
    ("lpips", "LPIPS", 3),
    ("fid", "FID", 2),
    ("kid_mean", "KID", 4),
)

# The script whose rows are scored as restorations; its ground truth comes with its samples, so its rows need no
# '# ref_batch:' line (a '# title:' line marks a row, as bases have none).
INVERSE_SCRIPT = "inverse_sample.py"

SUPPORTED_SCRIPTS = ("image_sample.py", "classifier_sample.py", "inverse_sample.py")

class ReproduceError(Exception):
    """
    A problem with one row (or with the command line) that the user can fix; the message says how.
    """


# --- configs ------------------------------------------------------------------------------------------------


def read_metadata(path):
    """
    The `# key: value` lines of a flag file's leading comment block, as a dict. Other comments are prose.
    """
    meta = {}
    with open(path) as f:
        for line in f:
            text = line.strip()
            if not text:
                continue
            if not text.startswith("#"):
                break
            key, sep, value = text[1:].partition(":")
            key = key.strip()
            if sep and key in METADATA_KEYS:
                if key in meta:
                    raise ReproduceError(f"{path}: '# {key}:' is given twice")
                meta[key] = value.strip()
    return meta


def parse_published(text, where):
    """
    'FID=26.2, IS=39.7' -> {"fid": 26.2, "inception_score": 39.7}; labels as in METRICS, case-insensitive.
    """
    labels = {label.lower(): key for key, label, _ in METRICS + RESTORATION_METRICS}
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        label, sep, value = item.partition("=")
        key = labels.get(label.strip().lower())
        if not sep or key is None:
            names = ", ".join(dict.fromkeys(label for _, label, _ in METRICS + RESTORATION_METRICS))
            raise ReproduceError(f"{where}: '# published:' item {item!r} is not NAME=NUMBER with NAME one of {names}")
        try:
            number = float(value)
        except ValueError:
            raise ReproduceError(f"{where}: '# published:' value {value.strip()!r} of {label.strip()} is not a number")
        if not math.isfinite(number):
            raise ReproduceError(f"{where}: '# published:' value of {label.strip()} must be finite")
        out[key] = number
    return out


class RowConfig:
    """
    One table row: its name, file and metadata.
    """

    def __init__(self, name, path, meta):
        self.name = name
        self.path = os.path.abspath(path)
        self.meta = meta
        self.script = meta.get("script", "")
        self.title = meta.get("title") or name
        self.feature_net = meta.get("feature_net") or "inception"
        self.published = parse_published(meta.get("published", ""), path)
        self.source = meta.get("source", "")
        self.restoration = self.script == INVERSE_SCRIPT
        self.metrics = RESTORATION_METRICS if self.restoration else METRICS
        # A sweep's point (sweeps.py): the flags the sampler gets after the config's, and what the point is.
        self.flags = ()
        self.sweep = None


def config_name(path):
    base = os.path.basename(path)
    return base[: -len(".cfg")] if base.endswith(".cfg") else base


def is_row_metadata(meta):
    """
    Whether a flag file's metadata makes it a table row (bases such as adm256_model.cfg are not).
    """
    return "ref_batch" in meta or (meta.get("script") == INVERSE_SCRIPT and "title" in meta)


def is_row(path):
    return is_row_metadata(read_metadata(path))


def load_row(path):
    meta = read_metadata(path)
    name = config_name(path)
    if not is_row_metadata(meta):
        raise ReproduceError(
            f"config {name} ({path}) is not a table row: it has no '# ref_batch:' line (shared bases such as "
            "adm256_model are included by rows, not run)"
        )
    if meta.get("script") not in SUPPORTED_SCRIPTS:
        raise ReproduceError(
            f"config {name} ({path}): '# script: {meta.get('script', '')}' must name one of "
            f"{', '.join(SUPPORTED_SCRIPTS)}"
        )
    return RowConfig(name, path, meta)


def select_configs(patterns, config_dir=CONFIG_DIR):
    """
    Expand config names, paths and globs over config names (e.g. 'digits16_*') into row configs, in the order
    given (each glob's matches sorted), without duplicates. A glob skips flag files that are not rows; a name
    or path must be a row.
    """
    rows, seen = [], set()
    for pattern in patterns:
        if any(ch in pattern for ch in "*?[") and not os.path.isfile(pattern):
            names = fnmatch.filter(available_configs(config_dir), pattern)
            paths = [config_path(n, config_dir) for n in names]
            found = [load_row(p) for p in paths if is_row(p)]
            if not found:
                raise ReproduceError(
                    f"no table row matches {pattern!r}; {suggest_names('', row_names(config_dir), 'rows', config_dir)}"
                )
        else:
            try:
                path = resolve_config(pattern, config_dir)
            except ValueError:
                raise ReproduceError(
                    f"unknown config {pattern!r}: no file {pattern} or {config_dir}/{pattern}.cfg; "
                    f"{suggest_names(pattern, row_names(config_dir), 'table rows', config_dir)}"
                ) from None
            found = [load_row(path)]
        for row in found:
            if row.path not in seen:
                seen.add(row.path)
                rows.append(row)
    return rows


def row_names(config_dir=CONFIG_DIR):
    paths = config_paths(config_dir)
    return [n for n in sorted(paths) if is_row(paths[n])]


def how_to_get(row, key):
    """
    The row's `# model_source:` or `# ref_batch_source:` as the start of a missing-file message ("" without one).
    """
    source = row.meta.get(key, "").rstrip(".")
    return f"{source}; " if source else ""


# --- labels and records ----------------------------------------------------------------------------------------


def steps_label(args):
    """
    'DDPM-250', 'DDIM-25', ... from a sampler's parsed flags.
    """
    respacing = (args.timestep_respacing or "").strip()
    if not respacing:
        count = args.diffusion_steps
    elif respacing.startswith("ddim"):
        count = int(respacing[len("ddim") :])
    else:
        count = sum(int(part) for part in respacing.split(","))
    return f"{'DDIM' if args.use_ddim else 'DDPM'}-{count}"


def read_json(path):
    """
    The JSON in `path`, or None when it is absent or unreadable (an unreadable record is simply redone).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def guidance_label(args):
    """
    The guidance a row samples with, as the log names it, without the default "every step" interval.
    """
    return describe_guidance(args).replace(", interval all", "")
