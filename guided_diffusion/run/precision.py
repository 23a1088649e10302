"""
The numerical policy of a sampling run on CUDA (see docs/cluster.md).

- TF32 off by default: PyTorch lets cuDNN run float32 convolutions in TF32 (10-bit mantissa), which moves uint8
  outputs of a short run by several levels against float32; fidelity to ADM's numbers comes first, so sampling
  turns TF32 off for convolutions and matmuls. --allow_tf32 True turns it on for speed on Ampere and newer GPUs.
- --deterministic True asks PyTorch for deterministic kernels everywhere (torch.use_deterministic_algorithms,
  cudnn.deterministic, a fixed cuBLAS workspace). Where PyTorch has none (reflection-pad backward on CUDA, used
  by DPS through a blur operator or a blur perturbation) the run goes on and says so in one line.
On the CPU every setting here is a no-op for the samples: its kernels are deterministic and never use TF32.
"""

import os

import torch as th

# cuBLAS needs a fixed workspace for deterministic matmuls; it reads this before its first call.
CUBLAS_WORKSPACE = ":4096:8"


def apply_precision_policy(allow_tf32=False, deterministic=False):
    """
    Set torch's global switches for this run: TF32 off unless allowed; deterministic kernels when asked.
    """
    th.backends.cudnn.allow_tf32 = bool(allow_tf32)
    th.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
    if deterministic:
        # Only set when absent: a user's own workspace setting stays.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        # warn_only: an op without a deterministic kernel warns instead of stopping a long run half-way; the
        # scripts say upfront where that happens (not_deterministic_note).
        th.use_deterministic_algorithms(True, warn_only=True)
        th.backends.cudnn.deterministic = True
        th.backends.cudnn.benchmark = False


def not_deterministic_note(deterministic, device, reason):
    """
    The one line to print when --deterministic cannot hold on `device` because of `reason` (what runs a backward
    pass through reflection padding), or None.
    """
    if not deterministic or reason is None or th.device(device).type != "cuda":
        return None
    return (
        f"--deterministic: {reason} backpropagates through reflection padding, which has no deterministic CUDA "
        "kernel in PyTorch, so reruns of this run can differ in the last bits"
    )
