"""
The results table of scripts/reproduce.py: every evaluated row a results folder holds (results/<row>/metrics.json,
results/<row>/seed<k>/metrics.json), as the entries of table.json and the markdown of table.md, ours beside the
published figures, with the mean and spread over seeds.
"""

import json
import math
import os
from types import SimpleNamespace

from ..common.atomic_io import write_json_atomic, write_text_atomic
from .table_rows import (
    INVERSE_SCRIPT,
    METRICS,
    RESTORATION_METRICS,
    ReproduceError,
    guidance_label,
    load_row,
    read_json,
    steps_label,
)


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


def write_table(results_dir, this_call):
    """
    Write table.md and table.json in `results_dir` from this call's rows and every earlier result there.
    :return: (path of table.md, number of its lines from earlier runs).
    """
    entries = table_entries(results_dir, this_call)
    table_md = os.path.join(results_dir, "table.md")
    write_text_atomic(table_md, render_table(entries))
    write_json_atomic(os.path.join(results_dir, "table.json"), {"rows": entries})
    return table_md, sum(1 for e in entries if e["status"].startswith("earlier run"))
