"""
What a result was made with, for the records kept beside it: the code's git commit, the library versions, the
device and the number of ranks.
"""

import platform
import socket
import subprocess
import time

import numpy as np
import torch as th

from ..common.errors import REPO_ROOT


def _git(*args):
    try:
        out = subprocess.run(
            ["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit():
    """
    (commit hash or None when the code is not a git checkout, True when tracked files differ from it).
    """
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def device_name(device):
    device = th.device(device)
    if device.type == "cuda" and th.cuda.is_available():
        return th.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment(device=None, ranks=None):
    """
    A JSON-ready description of where and with what a result is computed.
    """
    commit, dirty = git_commit()
    info = {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": th.__version__,
        "cuda": th.version.cuda,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = device_name(device)
    if ranks is not None:
        info["ranks"] = ranks
    return info
