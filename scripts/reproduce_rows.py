"""
What scripts/reproduce.py builds on, kept beside it (orchestration for that one script, not package API):
table-row configs and their header metadata, choosing configs by name or glob, the records that decide whether a
row is already done, finding checkpoints, running the sampler with its output passed through, and the results
table.

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
import subprocess
import sys
from types import SimpleNamespace

from guided_diffusion.assets import fetch_hint
from guided_diffusion.file_digest import file_record
from guided_diffusion.flag_files import CONFIG_DIR, available_configs, resolve_config, suggest_names
from guided_diffusion.guidance import describe_guidance
from guided_diffusion.run_store import FLAGS_FREE_ON_RESUME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

# Flags that do not change the samples, left out of the records compared (as in the samplers' resumable runs).
FREE_FLAGS = FLAGS_FREE_ON_RESUME


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


def config_name(path):
    base = os.path.basename(path)
    return base[: -len(".cfg")] if base.endswith(".cfg") else base


def _is_row_meta(meta):
    return "ref_batch" in meta or (meta.get("script") == INVERSE_SCRIPT and "title" in meta)


def is_row(path):
    return _is_row_meta(read_metadata(path))


def load_row(path):
    meta = read_metadata(path)
    name = config_name(path)
    if not _is_row_meta(meta):
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
            paths = [os.path.join(config_dir, n + ".cfg") for n in names]
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
    return [n for n in available_configs(config_dir) if is_row(os.path.join(config_dir, n + ".cfg"))]


# --- flags and records ----------------------------------------------------------------------------------------


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


def file_identity(path):
    """
    A file named by absolute path, size and content (SHA-256, computed once per file identity; see
    guided_diffusion/file_digest.py): a file replaced by another is a different one.
    """
    return file_record(path)


def read_json(path):
    """
    The JSON in `path`, or None when it is absent or unreadable (an unreadable record is simply redone).
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- running a row ----------------------------------------------------------------------------------------


def resolve_checkpoint(row, flag, value, opts, from_command_line, missing):
    """
    The absolute path of a checkpoint flag: --model_dir/FILE when given, else the config's path taken from the
    repository root (the command line's from the current folder). A missing file is noted in `missing`.
    """
    name = (row.meta.get("model") if flag == "model_path" else "") or os.path.basename(value)
    if opts.model_dir and not from_command_line:
        path = os.path.join(os.path.abspath(opts.model_dir), name)
    else:
        path = os.path.abspath(value) if from_command_line else os.path.join(REPO_ROOT, value)
    if not os.path.isfile(path):
        missing.append(
            f"checkpoint {name} (--{flag}) not found at {path}. {how_to_get(row, 'model_source')}put it there, "
            f"or pass --model_dir DIR with {name} in DIR{fetch_hint(path)}."
        )
    return path


def how_to_get(row, key):
    source = row.meta.get(key, "").rstrip(".")
    return f"{source}; " if source else ""


def run_streaming(command, extra_env=None):
    """
    Run a command with its output (stdout and stderr together) passed through; return (status, last lines).
    :param extra_env: environment variables to set for the command.
    """
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    try:
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            tail = (tail + chunk)[-8192:]
    except BaseException:
        # Interrupted or terminated on its own (a Ctrl-C reaches the whole process group, but a scheduler's or a
        # user's `kill` reaches this process only): stop the sampler too, or it would go on writing the row that
        # the next run resumes.
        stop_child(proc)
        raise
    return proc.wait(), tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()


def stop_child(proc, grace_s=10):
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the table ------------------------------------------------------------------------------------------------


def _usable_record(record):
    return (
        isinstance(record, dict)
        and isinstance(record.get("config"), str)
        and isinstance(record.get("flags"), dict)
        and isinstance(record.get("metrics"), dict)
    )


def settings_key(record, layout):
    """
    What makes metrics records one table line: the row, how it was run (one seed, or --seeds) and every setting but
    the seed.
    """
    flags = {k: v for k, v in record["flags"].items() if k != "seed"}
    settings = [flags, record.get("num_samples"), record.get("ref_batch"), record.get("feature_net")]
    return (record["config"], layout, json.dumps(settings, sort_keys=True, default=str))


def collect_results(results_dir):
    """
    Every evaluated result in a results folder: {settings_key: [metrics records]}, from results/<row>/metrics.json
    (layout 'single') and results/<row>/seed<k>/metrics.json (layout 'seeds', each settings group's seeds
    together, sorted by seed).
    """
    groups = {}
    try:
        names = sorted(os.listdir(results_dir))
    except OSError:
        return groups
    for name in names:
        row_dir = os.path.join(results_dir, name)
        if not os.path.isdir(row_dir):
            continue
        found = [("single", os.path.join(row_dir, "metrics.json"))]
        found += [
            ("seeds", os.path.join(row_dir, sub, "metrics.json"))
            for sub in sorted(os.listdir(row_dir))
            if sub.startswith("seed") and sub[len("seed"):].isdigit()
        ]
        for layout, path in found:
            record = read_json(path)
            if _usable_record(record):
                groups.setdefault(settings_key(record, layout), []).append(record)
    for records in groups.values():
        records.sort(key=lambda r: (r["flags"].get("seed") is None, r["flags"].get("seed")))
    return groups


def _row_of_record(record):
    """
    The row a metrics record belongs to: its config as it is now when that still exists, else what the record
    kept of it.
    """
    path = record.get("config_path")
    if path and os.path.isfile(path):
        try:
            return load_row(path)
        except (ReproduceError, OSError):
            pass
    restoration = record.get("script") == INVERSE_SCRIPT
    return SimpleNamespace(
        name=record["config"],
        title=record.get("title") or record["config"],
        published=record.get("published") or {},
        source=record.get("source") or "",
        restoration=restoration,
        metrics=RESTORATION_METRICS if restoration else METRICS,
    )


def table_entries(results_dir, this_call):
    """
    The entries of table.md and table.json: this call's rows first, in its order, then every other result found in
    the results folder (earlier calls' rows, or other settings of the same rows), so the table always shows all
    the results the folder holds. A row this call evaluated shows every seed of its settings found in the folder.

    :param this_call: [(row, parsed flags or None, metrics records or None, status, layout)].
    """
    groups = collect_results(results_dir)
    entries = []
    for row, args, records, status, layout in this_call:
        if records:
            records = groups.pop(settings_key(records[0], layout), records)
        entries.append(table_row(row, args, records, status))
    for key in sorted(groups):
        records = groups[key]
        row = _row_of_record(records[0])
        try:
            args = SimpleNamespace(**records[0]["flags"])
            entry = table_row(row, args, records, "")
        except (AttributeError, KeyError, TypeError, ValueError):
            continue  # a record of another version of the code that lacks a flag the table shows
        finished = max(((r.get("timing") or {}).get("finished") or "") for r in records)
        entry["status"] = f"earlier run (finished {finished})" if finished else "earlier run"
        entries.append(entry)
    return entries


def _number(value, digits):
    return "–" if value is None else f"{value:.{digits}f}"


def _mean(values):
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _with_spread(value, spread, digits):
    if spread is None or value is None:
        return _number(value, digits)
    return f"{value:.{digits}f} ± {spread:.{digits}f}"


def table_row(row, args, metrics_records, status):
    """
    One entry of table.json: what the row is and what it gave (metrics None when it was not evaluated). With
    several records (one per seed) the metrics are their means, metrics_std their sample standard deviations
    (ddof 1) and per_seed each seed's figures.
    """
    records = list(metrics_records or [])
    metrics, metrics_std, per_seed = None, None, None
    if records:
        metrics = {key: _mean([r["metrics"].get(key) for r in records]) for key, _, _ in row.metrics}
    if len(records) > 1:
        metrics_std = {key: _std([r["metrics"].get(key) for r in records]) for key, _, _ in row.metrics}
        per_seed = {str(r["flags"].get("seed")): r["metrics"] for r in records}
    return {
        "config": row.name,
        "title": row.title,
        "steps": steps_label(args) if args is not None else None,
        "pag_scale": args.pag_scale if args is not None else None,
        "pag_layers": args.pag_layers if args is not None and args.pag_scale != 0 else None,
        "kind": "restoration" if row.restoration else "generation",
        "guidance": guidance_label(args) if args is not None else None,
        "num_samples": args.num_samples if args is not None else None,
        "metrics": metrics,
        "metrics_std": metrics_std,
        "seeds": sorted(int(k) for k in per_seed) if per_seed else None,
        "per_seed": per_seed,
        "published": row.published or None,
        "source": row.source or None,
        "status": status,
    }


def guidance_label(args):
    """
    The guidance a row samples with, as the log names it, without the default "every step" interval.
    """
    return describe_guidance(args).replace(", interval all", "")


def _metric_table(entries, metrics):
    """
    The markdown lines of one table: a line per evaluated entry, with the published figures beside ours when any
    entry carries them.
    """
    with_paper = any(e["published"] for e in entries)
    header = ["Config", "Title", "Steps", "Guidance", "N"]
    for _, label, _ in metrics:
        header.append(label)
        if with_paper:
            header.append(f"{label} (paper)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [
            f"`{e['config']}`",
            e["title"],
            e["steps"],
            e.get("guidance") or "–",
            str(e["num_samples"]),
        ]
        spread = e.get("metrics_std") or {}
        for key, _, digits in metrics:
            cells.append(_with_spread(e["metrics"].get(key), spread.get(key), digits))
            if with_paper:
                cells.append(_number((e["published"] or {}).get(key), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_table(entries):
    """
    Markdown: one line per evaluated row, ours and (where any row carries them) the published figures side by
    side, generation rows and inverse-problem rows in separate tables; rows without metrics are listed under the
    tables with the reason.
    """
    missing = [e for e in entries if e["metrics"] is None]
    generation = [e for e in entries if e["metrics"] is not None and e.get("kind") != "restoration"]
    restoration = [e for e in entries if e["metrics"] is not None and e.get("kind") == "restoration"]
    lines = []
    if generation or not restoration:
        lines += _metric_table(generation, METRICS)
    if restoration:
        if lines:
            lines += ["", "Inverse problems (reconstructions against their ground truth):", ""]
        lines += _metric_table(restoration, RESTORATION_METRICS)
    out = ["# Results", "", *lines, ""]
    seeded = sorted({tuple(e["seeds"]) for e in entries if e.get("seeds")})
    if seeded:
        seeds = "; ".join(", ".join(str(s) for s in group) for group in seeded)
        out += [f"Figures are mean ± sample standard deviation over seeds {seeds}.", ""]
    sources = sorted({e["source"] for e in entries if e["published"] and e["source"]})
    if sources:
        out += ["Published figures: " + "; ".join(sources) + ".", ""]
    if missing:
        out += ["Not evaluated:", ""]
        out += [f"- `{e['config']}`: {e['status']}" for e in missing]
        out.append("")
    return "\n".join(out)
