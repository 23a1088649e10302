"""
Checks that an output file can be written, made before any work, so a long evaluation is never lost to an
unwritable path at its end.
"""

import os

from guided_diffusion.common.atomic_io import nearest_existing, probe_write


class OutputPathError(ValueError):
    """An output path that cannot be written (one line, naming the path and the reason)."""


def check_output_file(path, what):
    """
    Raise OutputPathError unless a file can be written atomically at `path` (a temporary file beside it, then a
    rename): `path` must not be a folder, and a file must be creatable in its folder, tried with a real write in
    the nearest existing folder on the way (atomic_io.probe_write). Creates nothing.

    :param what: how the user gave the path, e.g. "--json results.json", for the message.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise OutputPathError(f"{what}: {path} is a folder; give the path of a file")
    folder = os.path.dirname(path)
    probe = nearest_existing(folder)
    if not os.path.isdir(probe):
        raise OutputPathError(f"{what}: {probe} is a file, not a folder, so {path} cannot be written")
    exc = probe_write(probe)
    if exc is not None:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(f"{what}: cannot write a file in {folder} ({reason})")
