"""
Sweeps for scripts/reproduce.py: a grid of sampler flags over table rows, each point of the grid one more row.

    python scripts/reproduce.py digits16_ddim10_pag3 digits16_ddim10_sag \
        --sweep scale=0,1,3 --sweep timestep_respacing=ddim10,ddim20 --seeds 0,1,2

`--sweep KEY=V1,V2,...` gives a sampler flag (without its dashes) and its values; values holding commas (a
sectioned respacing such as 10,10) are separated by `;` instead. KEY `scale` is the scale of whichever guidance
method the row turns on (pag_scale for a PAG row, sag_scale for a SAG row, ...), so rows of two methods sweep their
scales in one grid; a row without guidance has no scale and runs once per value of the other keys (the unguided
reference beside the curves). Each point is the row's flags followed by the grid's: named
`ROW@key=value,key=value` (results/ROW@.../), titled with the row's title and the point, and cached, resumed and
tabled as any row (by the content of its flags and inputs).
"""

import copy
import itertools

from ..run.guidance import guidance_specs
from .table_rows import ReproduceError

SCALE = "scale"
POINT_SEPARATOR = "@"

# Flags reproduce.py sets itself or that have their own option.
RESERVED = {"out_dir": "--results", "seed": "--seeds", "num_samples": "--num_samples", "shard": "(none)"}


def parse_grid(items):
    """
    [(key, [values])] from the --sweep items "KEY=V1,V2,..." (";" separates values that hold commas).
    """
    grid, seen = [], set()
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        separator = ";" if ";" in text else ","
        values = [v.strip() for v in text.split(separator)]
        if not sep or not key or not text.strip() or any(not v for v in values):
            raise ReproduceError(
                f"--sweep {item!r} is not KEY=V1,V2,... (a sampler flag without its dashes, or 'scale', and its "
                "values; separate values holding commas with ';')"
            )
        if key in RESERVED:
            raise ReproduceError(f"--sweep {key}: reproduce.py sets --{key} itself; use {RESERVED[key]}")
        if key in seen:
            raise ReproduceError(f"--sweep {key} is given twice; give all its values in one --sweep {key}=V1,V2,...")
        if len(set(values)) != len(values):
            raise ReproduceError(f"--sweep {item!r} repeats a value")
        seen.add(key)
        grid.append((key, values))
    return grid


def check_grid_flags(grid, extra):
    """
    Refuse a grid key also passed to the sampler after `--`: one of the two would silently win.
    """
    for key, _ in grid:
        flag = f"--{key}"
        if any(token == flag or token.startswith(flag + "=") for token in extra):
            raise ReproduceError(f"--sweep {key} and {flag} after `--` both set it; give it in one place")


def scale_flag(row, parse, extra=()):
    """
    The scale flag of the guidance method the row turns on (e.g. 'pag_scale'), or None for an unguided row.
    :param parse: parse(row, tokens) -> the sampler's parsed flags; extra: the flags after `--`.
    """
    args = parse(row, ["@" + row.path, *extra])
    enabled = [method.switch for method, spec in guidance_specs(args) if spec.enabled]
    if len(enabled) > 1:
        raise ReproduceError(
            f"row {row.name} turns on {', '.join(enabled)}: the grid's 'scale' cannot tell which to sweep; name "
            "the flag (e.g. --sweep pag_scale=...)"
        )
    return enabled[0] if enabled else None


def point_name(base, point):
    if not point:
        return base  # a row no key of the grid applies to (an unguided row under a scale-only grid)
    return base + POINT_SEPARATOR + ",".join(f"{key}={value}" for key, value in point)


def make_point(row, point, flags):
    """
    The row of one grid point: the base row's config and metadata, its own name and title, and the flags the
    sampler gets after the config's.
    :param point: [(key as given in the grid, value)]; flags: [(sampler flag, value)].
    """
    out = copy.copy(row)
    out.meta = dict(row.meta)
    out.name = point_name(row.name, point)
    out.title = f"{row.title} [{', '.join(f'{k}={v}' for k, v in point)}]"
    out.flags = tuple(token for flag, value in flags for token in (f"--{flag}", str(value)))
    out.sweep = {"base": row.name, "point": {key: value for key, value in point}, "flags": dict(flags)}
    return out


def expand_rows(rows, grid, parse, extra=(), log=None):
    """
    Every row at every point of the grid, in order (rows, then the grid's points with the last key fastest).
    An unguided row skips the 'scale' key. Each key must be a flag of the row's sampler (checked by parsing).
    """
    if not grid:
        return rows
    points = []
    for row in rows:
        keys = [key for key, _ in grid]
        switch = scale_flag(row, parse, extra) if SCALE in keys else None
        axes = [(key, values) for key, values in grid if key != SCALE or switch]
        if SCALE in keys and not switch and log is not None:
            log(f"{row.name} samples without guidance: the grid's scale does not apply to it")
        for combo in itertools.product(*[values for _, values in axes]):
            point = [(key, value) for (key, _), value in zip(axes, combo)]
            flags = [(switch if key == SCALE else key, value) for key, value in point]
            check_grid_flags(flags, extra)
            candidate = make_point(row, point, flags)
            parse(candidate, ["@" + row.path, *extra, *candidate.flags])  # a key the sampler lacks, a bad value
            points.append(candidate)
    return points


def point_of_record(row, sweep):
    """
    The point row a metrics record's `sweep` names, from its base row as it is now.
    """
    point = list((sweep.get("point") or {}).items())
    flags = list((sweep.get("flags") or {}).items())
    return make_point(row, point, flags)
