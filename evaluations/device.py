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
