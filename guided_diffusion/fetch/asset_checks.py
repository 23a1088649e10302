"""
How a copy of a released file (assets.py's catalogue) is checked before fetch_assets.py puts it in place: a
checkpoint loads with strict=True into its architecture, a reference batch holds uint8 images, a torch hub file's
sha256 starts with the digits in its name, LPIPS's linear layers have their backbone's widths.
"""

import os
import re
import zipfile

import numpy as np
import torch

from evaluations.restoration import LPIPS_BACKBONES

from .. import script_util as su
from ..common.file_digest import sha256_of


class VerificationError(Exception):
    """A file that is not the released one; the message says how it differs."""


def sha256_prefix_in_name(name):
    """The hex digits torch hub's naming puts before the extension ('...-6726825d.pth' -> '6726825d'), or None."""
    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", name)
    return m.group(1) if m else None


def build_architecture(builder, flags):
    """The network a checkpoint must fit, on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        if builder == "classifier":
            args = {**su.classifier_defaults(), **flags}
            return su.create_classifier(**{k: args[k] for k in su.classifier_defaults()})
        if builder == "upsampler":
            return su.sr_create_model_and_diffusion(**{**su.sr_model_and_diffusion_defaults(), **flags})[0]
        return su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})[0]


def _first_line(exc):
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _torch_load(path):
    # A zip-format checkpoint is memory-mapped: its keys and shapes are read, not its gigabytes of weights.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many kinds here (zip, pickle, EOF, runtime)
        raise VerificationError(
            f"torch.load cannot read it ({type(exc).__name__}: {_first_line(exc)}): truncated or not a PyTorch file"
        ) from None


def check_state_dict(asset, state):
    """Raise VerificationError unless `state` loads with strict=True into the asset's architecture."""
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise VerificationError(f"it holds a {type(state).__name__}, not a state dict")
    model = build_architecture(asset.builder, asset.flags)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or reshaped:
        parts = [
            f"{len(keys)} {label} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
            if keys
        ]
        raise VerificationError(
            f"its keys do not fit the architecture of {asset.name} ({len(expected)} tensors): " + ", ".join(parts)
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise VerificationError(f"it does not load with strict=True: {_first_line(exc)}") from None


def _check_reference_batch(path):
    if not zipfile.is_zipfile(path):
        raise VerificationError("not an npz file (no zip directory at its end: truncated, or another format)")
    try:
        with zipfile.ZipFile(path) as archive:
            if "arr_0.npy" not in archive.namelist():
                raise VerificationError("it has no arr_0 (the images)")
            with archive.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
                shape, _, dtype = reader(f)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise VerificationError(f"its arr_0 cannot be read ({_first_line(exc)})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise VerificationError(f"arr_0 is {dtype} of shape {shape}, not uint8 N x H x W x 3 images")


def _check_lpips_linear(asset, path):
    state = _torch_load(path)
    channels = LPIPS_BACKBONES[asset.flags["net"]][2]
    for k, c in enumerate(channels):
        key = f"lin{k}.model.1.weight"
        if not isinstance(state, dict) or key not in state or tuple(state[key].shape) != (1, c, 1, 1):
            raise VerificationError(f"'{key}' is missing or not shaped (1, {c}, 1, 1), as LPIPS v0.1's {asset.flags['net']}.pth has it")


def verify(asset, path):
    """
    Raise VerificationError unless the file at `path` passes the asset's check; return what was checked.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise VerificationError("it is empty" if os.path.isfile(path) else "it does not exist")
    if asset.check == "checkpoint":
        check_state_dict(asset, _torch_load(path))
        return "loads with strict=True into its architecture"
    if asset.check == "reference_batch":
        _check_reference_batch(path)
        return "an npz of uint8 images in arr_0"
    if asset.check == "sha256_name":
        prefix = sha256_prefix_in_name(asset.published_name)
        digest = sha256_of(path)
        if not digest.startswith(prefix):
            raise VerificationError(f"its sha256 is {digest[:16]}..., but its name says it starts with {prefix}")
        return f"sha256 starts with {prefix}"
    if asset.check == "lpips_linear":
        _check_lpips_linear(asset, path)
        return f"LPIPS v0.1 {asset.flags['net']} linear layers"
    raise ValueError(f"unknown check {asset.check!r} for {asset.name}")
