"""
Checks that an output file can be written, made before any work, so a long evaluation is never lost to an
unwritable path at its end.
"""

import os
import tempfile

from guided_diffusion.atomic_io import TMP_PREFIX


class OutputPathError(ValueError):
    """An output path that cannot be written (one line, naming the path and the reason)."""


def check_output_file(path, what):
    """
    Raise OutputPathError unless a file can be written atomically at `path` (a temporary file beside it, then a
    rename): `path` must not be a folder, and a file must be creatable in its folder. The check really writes
    (os.access says yes to root on a read-only mount or in /proc), creating missing folders for the probe, and
    removes all it made.

    :param what: how the user gave the path, e.g. "--json results.json", for the message.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise OutputPathError(f"{what}: {path} is a folder; give the path of a file")
    folder = os.path.dirname(path)
    created = []
    probe = folder
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OutputPathError(f"{what}: {probe} is a file, not a folder, so {path} cannot be written")
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=TMP_PREFIX + "probe-"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputPathError(f"{what}: cannot write a file in {folder} ({reason})") from None
    finally:
        for made in created:  # innermost first
            try:
                os.rmdir(made)
            except OSError:
                pass
