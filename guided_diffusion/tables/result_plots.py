"""
The curves of a results folder's sweeps (reproduce.py --sweep), as PNG files beside table.md, one set per model:

    <model>_fid_vs_scale.png        FID against the guidance scale, one line per swept row and setting
    <model>_precision_recall.png    precision against recall over the scale (the trade-off figures of guidance
                                    papers), each point labelled with its scale
    <model>_fid_vs_evaluations.png  FID against model evaluations per sample (a guided call at its cost in plain
                                    calls): methods side by side at equal compute, the unguided rows over their
                                    step counts beside the guided ones
    <model>_fid_vs_seconds.png      FID against sampling seconds per sample on the device the samples were made on

Error bars are the sample standard deviation over --seeds. The points are table.json's entries that belong to a
sweep; matplotlib draws them (the `plots` extra); without it one line says how to install it.
"""

import io
import json
import os
import re

from ..common.atomic_io import atomic_write

INSTALL_HINT = "pip install matplotlib (or pip install -e '.[plots]')"
# Point keys that change the step count: the cost plots connect a row's points over them.
STEP_KEYS = ("timestep_respacing", "use_ddim")
# Line styles of the rows whose scale is not swept (drawn as horizontal references).
REFERENCE_STYLES = ("--", ":", "-.")


def sweep_entries(entries):
    return [e for e in entries if e.get("sweep") and e.get("metrics") and e.get("kind") != "restoration"]


def _label(base, items):
    return base + (f" ({', '.join(f'{k}={v}' for k, v in items)})" if items else "")


def _series(entries, drop):
    """
    {label: [entries]} with the entries of one base row and the same point values but those of `drop` together.
    """
    groups = {}
    for e in entries:
        items = [(k, v) for k, v in e["sweep"]["point"].items() if k not in drop]
        groups.setdefault(_label(e["sweep"]["base"], items), []).append(e)
    return groups


def _metric(e, key):
    value = (e.get("metrics") or {}).get(key)
    spread = (e.get("metrics_std") or {}).get(key)
    return value, spread


def _title(what, entries, model):
    steps = sorted({e.get("steps") or "?" for e in entries})
    counts = sorted({e.get("num_samples") for e in entries if e.get("num_samples")})
    seeds = sorted({tuple(e["seeds"]) for e in entries if e.get("seeds")})
    if seeds:
        seed_text = "seeds " + "; ".join(",".join(str(s) for s in group) for group in seeds) + " (bars: ±1 sd)"
    else:
        seed_text = "one seed"
    return f"{what}\n{model}, {', '.join(steps)}, {'/'.join(str(c) for c in counts)} samples per point, {seed_text}"


# matplotlib's default ten ("tab10").
TEN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]


def _save(figure, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 5.0))
    ax = figure.add_subplot(1, 1, 1)
    # Ten colours, then the same ten with another marker: a sweep of many rows keeps every line distinct.
    ax.set_prop_cycle(color=TEN_COLOURS * 3, marker=[m for m in "os^" for _ in TEN_COLOURS])
    return figure, ax


def _finish(ax, title, xlabel, ylabel):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    # Beside the axes, where it covers no point.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _draw_line(ax, points, label, annotate=None):
    """
    points: [(x, y, yerr, xerr, text)] sorted by x; x or y None are left out.
    """
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return False
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    yerr = [p[2] or 0.0 for p in points] if any(p[2] for p in points) else None
    xerr = [p[3] or 0.0 for p in points] if any(p[3] for p in points) else None
    ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, capsize=3, label=label)
    for x, y, _, _, text in points:
        if annotate and text:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    return True


def _scale_keys(entries):
    return ("scale",) + tuple(sorted({k for e in entries for k in e["sweep"]["point"] if k.endswith("_scale")}))


def _swept_scale(group, keys):
    return any(k in e["sweep"]["point"] for e in group for k in keys)


def plot_fid_vs_scale(entries, model, path):
    keys = _scale_keys(entries)
    if not _swept_scale(entries, keys):
        return False  # no scale swept (e.g. a sweep over layers): no curve over the scale to draw
    figure, ax = _figure()
    drawn, references = False, 0
    for label, group in _series(entries, keys).items():
        if not _swept_scale(group, keys):
            # A row whose scale the grid does not sweep (an unguided row): its FID as a reference line.
            for e in group:
                fid, _ = _metric(e, "fid")
                if fid is not None:
                    ax.axhline(fid, linestyle=REFERENCE_STYLES[references % len(REFERENCE_STYLES)], color="gray",
                               linewidth=1, label=f"{label}: {e.get('guidance') or 'scale not swept'} (FID {fid:.2f})")
                    references += 1
                    drawn = True
            continue
        points = sorted(((e.get("scale"), *_metric(e, "fid"), None, None) for e in group),
                        key=lambda p: (p[0] is None, p[0] or 0.0))
        drawn |= _draw_line(ax, points, label)
    if not drawn:
        return False
    _finish(ax, _title("FID against guidance scale", entries, model), "guidance scale s (0: no guidance)",
            "FID (lower is better)")
    _save(figure, path)
    return True


def plot_precision_recall(entries, model, path):
    figure, ax = _figure()
    drawn = False
    for label, group in _series(entries, _scale_keys(entries)).items():
        points = []
        for e in sorted(group, key=lambda e: e.get("scale") or 0.0):
            recall, recall_sd = _metric(e, "recall")
            precision, precision_sd = _metric(e, "precision")
            points.append((recall, precision, precision_sd, recall_sd, f"s={e.get('scale') or 0:g}"))
        drawn |= _draw_line(ax, points, label, annotate=True)
    if not drawn:
        return False
    _finish(ax, _title("Precision against recall over the guidance scale (labels: s)", entries, model),
            "recall (higher: more diversity)", "precision (higher: more fidelity)")
    _save(figure, path)
    return True


def plot_fid_vs_cost(entries, model, path, key, xlabel, what):
    figure, ax = _figure()
    drawn = False
    for label, group in _series(entries, STEP_KEYS).items():
        points = []
        for e in group:
            fid, spread = _metric(e, "fid")
            points.append((e.get(key), fid, spread, e.get(key + "_std"), e.get("steps")))
        drawn |= _draw_line(ax, sorted(points, key=lambda p: (p[0] is None, p[0] or 0)), label, annotate=True)
    if not drawn:
        return False
    _finish(ax, _title(what, entries, model), xlabel, "FID (lower is better)")
    _save(figure, path)
    return True


def _model_stem(model):
    stem = os.path.splitext(os.path.basename(model or "model"))[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "model"


def write_plots(results_dir, entries=None):
    """
    Draw the curves of the sweeps in `results_dir` (from its table.json unless `entries` are given).
    :return: lines for the log (the files written, or how to get matplotlib); none without sweeps.
    """
    if entries is None:
        try:
            with open(os.path.join(results_dir, "table.json")) as f:
                entries = json.load(f)["rows"]
        except (OSError, ValueError, KeyError):
            return []
    entries = sweep_entries(entries)
    if not entries:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [f"no plots: matplotlib is not installed; {INSTALL_HINT} draws the sweeps' curves beside the table"]
    models = {}
    for e in entries:
        models.setdefault(e.get("model") or "model", []).append(e)
    written = []
    for model, group in models.items():
        stem = os.path.join(results_dir, _model_stem(model))
        plots = [
            (plot_fid_vs_scale, (group, model, stem + "_fid_vs_scale.png")),
            (plot_precision_recall, (group, model, stem + "_precision_recall.png")),
            (plot_fid_vs_cost, (group, model, stem + "_fid_vs_evaluations.png", "evaluations_per_sample",
                                "model evaluations per sample (plain U-Net calls; a guided call at its cost)",
                                "FID against compute: model evaluations per sample")),
            (plot_fid_vs_cost, (group, model, stem + "_fid_vs_seconds.png", "seconds_per_sample",
                                "sampling seconds per sample"
                                + (f" ({'; '.join(_devices(group))})" if _devices(group) else ""),
                                "FID against sampling time per sample")),
        ]
        for draw, args in plots:
            if draw(*args):
                written.append(args[2])
    return [f"wrote {len(written)} plots: " + ", ".join(written)] if written else []


def _devices(entries):
    return sorted({d for e in entries for d in e.get("sampling_devices") or []})
