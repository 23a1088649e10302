"""
The error the command-line scripts turn into one `prog: error: ...` line and exit status 2.
"""

import argparse
import os

from .launch_env import rank

# The checkout holding this package; the configs' relative paths (models/, datasets/) are relative to it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UsageError(ValueError):
    """
    A flag value or input file the scripts cannot run with; the message says which flag or file and what to pass
    instead.
    """


def exit_with_usage_error(parser, exc):
    """
    Print a UsageError as argparse prints its own errors, without the long usage text (ADM's scripts have dozens
    of flags) and once per run rather than once per MPI rank; exit with status 2.
    """
    if rank() == 0:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    raise SystemExit(2)


def not_found(path):
    """
    What to say of a path that does not exist: where a relative one was looked for and, when it exists relative to
    the repository root (the configs' paths do), to run from there.
    """
    if os.path.isabs(path) or "://" in path:
        return "no such file or folder"
    said = f"no such file or folder in {os.getcwd()}"
    if os.path.exists(os.path.join(REPO_ROOT, path)):
        said += f"; it is relative to the repository root: run from {REPO_ROOT} or pass an absolute path"
    return said


def check_data_dir(path, flag="--data_dir"):
    """
    Refuse a missing or nonexistent training-data path before anything is set up.
    """
    if not path:
        raise UsageError(
            f"{flag} is required: pass a folder of images (class = file name prefix before '_') or an .npz with "
            "uint8 NHWC images in arr_0 and optional labels in arr_1 (e.g. datasets/digits16.npz)"
        )
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: {not_found(path)}")
    return path


def check_training_data(parser, args):
    """
    The training scripts' data checks (--data_dir, and --val_data_dir where the script has it), as one error line.
    """
    try:
        check_data_dir(args.data_dir)
        if getattr(args, "val_data_dir", ""):
            check_data_dir(args.val_data_dir, "--val_data_dir")
    except UsageError as exc:
        exit_with_usage_error(parser, exc)


class OneLineErrorParser(argparse.ArgumentParser):
    """
    An ArgumentParser whose errors are one `prog: error: ...` line, printed once per run (--help prints the usage).
    """

    def error(self, message):
        exit_with_usage_error(self, message)
