"""
Flag files: `script.py @configs/NAME.cfg --more flags` reads flags from a file, as if typed.

A flag file holds the same flags a user would type, any number per line; `#` starts a comment. Flags given after
it on the command line override it (argparse keeps the last value). `@NAME` alone also finds `configs/NAME.cfg`.
Unknown flags are an error that names the file they came from, so a typo never becomes a silent default.
"""

import argparse
import difflib
import os
import re
import shlex
import sys

from ..common.errors import REPO_ROOT, OneLineErrorParser

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
CONFIG_SUFFIX = ".cfg"


def config_paths(config_dir=CONFIG_DIR):
    """
    {NAME: path} of the flag files NAME.cfg in config_dir and its subfolders (configs/ keeps one folder per model:
    adm256/, adm128/, ffhq256/, lsun/, digits16/); names are unique across the folders, so a name alone finds its
    file.
    """
    found = {}
    for root, dirs, files in os.walk(config_dir):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(CONFIG_SUFFIX):
                found.setdefault(f[: -len(CONFIG_SUFFIX)], os.path.join(root, f))
    return found


def available_configs(config_dir=CONFIG_DIR):
    return sorted(config_paths(config_dir))


def config_path(name, config_dir=CONFIG_DIR):
    """The path of the flag file NAME.cfg under config_dir (in whichever subfolder), or None."""
    return config_paths(config_dir).get(name)


def resolve_config(name, config_dir=CONFIG_DIR):
    """
    Path of a flag file given as a path or as a config name; a clear error when neither exists.
    """
    candidates = [name, os.path.join(config_dir, name), config_path(name, config_dir)]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    hint = suggest_names(name, available_configs(config_dir), "configs", config_dir)
    raise ValueError(f"unknown config {name!r}: no file {name} or {config_dir}/{name}{CONFIG_SUFFIX}; {hint}")


def suggest_names(name, names, what, where, limit=10):
    """
    What to say after "unknown NAME": the close names ("did you mean ...?"), else the names when they are few,
    else how many there are and where (a list of a hundred names is not an error message).
    """
    close = difflib.get_close_matches(os.path.basename(name).removesuffix(CONFIG_SUFFIX), names, n=4, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    if not names:
        return f"{where} holds no {what}"
    if len(names) <= limit:
        return f"{what} in {where}: {', '.join(names)}"
    return f"{len(names)} {what} are in {where} (ls {where} lists them)"


def read_flag_file(path):
    with open(path) as f:
        tokens = []
        for line in f:
            tokens.extend(shlex.split(line, comments=True))
    return tokens


# Flags whose value may itself be an @FILE that the flag reads (autoguidance's guide flags): not spliced in here.
FLAG_FILE_VALUES = ("--ag_model_flags",)


def expand_flag_files(argv, _seen=()):
    """
    Replace every `@FILE` in argv by the flags in FILE (recursively), except the value of a flag of
    FLAG_FILE_VALUES. Returns (tokens, origins), where origins[i] names where tokens[i] came from ("command line"
    or the file path).
    """
    tokens, origins = [], []
    for i, arg in enumerate(argv):
        if arg.startswith("@") and len(arg) > 1 and not (i and argv[i - 1] in FLAG_FILE_VALUES):
            path = resolve_config(arg[1:])
            if os.path.abspath(path) in _seen:
                raise ValueError(f"flag file {path} includes itself")
            sub_tokens, sub_origins = expand_flag_files(
                read_flag_file(path), _seen + (os.path.abspath(path),)
            )
            tokens.extend(sub_tokens)
            origins.extend(o if o != "command line" else path for o in sub_origins)
        else:
            tokens.append(arg)
            origins.append("command line")
    return tokens, origins


def parse_args_with_flag_files(parser, argv=None):
    """
    parser.parse_args, with @flag files expanded and unknown flags reported with their origin.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        tokens, origins = expand_flag_files(argv)
    except ValueError as exc:
        parser.error(str(exc))
    tokens, origins = _attach_negative_values(parser, tokens, origins)
    args, unknown = parser.parse_known_args(tokens)
    if unknown:
        # argparse returns the unknown tokens in order, so a forward scan finds where each came from.
        where, cursor = {}, 0
        for tok in unknown:
            index = tokens.index(tok, cursor) if tok in tokens[cursor:] else None
            origin = "command line" if index is None else origins[index]
            cursor = cursor if index is None else index + 1
            where.setdefault(origin, []).append(tok)
        details = "; ".join(f"{' '.join(toks)} (from {origin})" for origin, toks in where.items())
        parser.error(f"unrecognized arguments: {details}")
    return args


# A value that starts with "-" but is not a plain negative number (argparse accepts those), e.g. "-10,400".
_DASHED_VALUE = re.compile(r"^-[0-9.]")


def _attach_negative_values(parser, tokens, origins):
    """
    `--flag -10,400` -> `--flag=-10,400`: argparse would take "-10,400" for an option and say "expected one
    argument"; a value that starts with a digit after the dash is never one of these scripts' options.
    """
    out_tokens, out_origins, i = [], [], 0
    while i < len(tokens):
        tok = tokens[i]
        action = parser._option_string_actions.get(tok) if tok.startswith("--") else None
        if (
            action is not None
            and action.nargs is None
            and i + 1 < len(tokens)
            and _DASHED_VALUE.match(tokens[i + 1])
        ):
            out_tokens.append(f"{tok}={tokens[i + 1]}")
            out_origins.append(origins[i])
            i += 2
            continue
        out_tokens.append(tok)
        out_origins.append(origins[i])
        i += 1
    return out_tokens, out_origins


def config_flags(path):
    """
    The flags in a flag file as a {name: string value} dict (for records and for comparing runs).
    """
    tokens, _ = expand_flag_files(["@" + path])
    flags, key = {}, None
    for tok in tokens:
        if tok.startswith("--"):
            key = tok[2:]
            flags[key] = ""
        elif key is not None:
            flags[key] = tok
            key = None
    return flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """
    The scripts' docstrings as written, and flag help in a column wide enough for ADM's long flag names.
    """

    def __init__(self, prog, **kwargs):
        kwargs.setdefault("max_help_position", 36)
        super().__init__(prog, **kwargs)

    def _expand_help(self, action):
        text = super()._expand_help(action)
        if action.default in ("", None):
            # "off" and "not given" are said in the help text itself.
            text = text.replace(f" (default: {action.default})", "")
        return text


class FlagFileArgumentParser(OneLineErrorParser):
    """
    An ArgumentParser whose parse_args understands @flag files and whose errors are one line (ADM's scripts have
    dozens of flags: the usage text would bury the message; --help prints it).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("usage", "%(prog)s [@CONFIG ...] [--FLAG VALUE ...]   (flags by group below)")
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        if namespace is not None:
            return super().parse_args(args, namespace)
        return parse_args_with_flag_files(self, args)
