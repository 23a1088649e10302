"""
Device selection and float32 settings shared by feature extraction and the metrics.
"""

from contextlib import contextmanager

import torch


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def strict_float32():
    """
    Disable TF32 for the duration: on Ampere and newer GPUs cuDNN convolutions use TF32 by
    default, which moves Inception features (and hence FID) away from the float32 numbers
    ADM's TensorFlow evaluator produces.
    """
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def fast_gpu_precision():
    """
    The opt-in fast GPU mode (--fast_gpu): TF32 matrix products and convolutions and float16
    autocast for the Inception network. Its features are not ADM's float32 ones: how far they
    and FID move is what benchmarks/evaluator_throughput.py --fast_gpu measures. Figures for
    tables are computed without it.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def resolve_device(spec=None):
    """
    The --device value checked against this machine: None gives default_device(); a string
    torch does not parse, or a CUDA/MPS device this machine does not have, raises ValueError
    with one line saying what to pass instead.
    """
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a torch device; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {spec}: CUDA is not available here (torch {torch.__version__} "
                "without CUDA, or no GPU visible); pass --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(f"--device {spec}: MPS is not available here; pass --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {spec}: the evaluator runs on cpu, cuda or mps")
    return spec
