import os

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADM_REFERENCE = os.environ.get(
    "ADM_REFERENCE_DIR", os.path.join(os.path.dirname(REPO_ROOT), "shared", "adm_reference")
)

# Two cores are shared by everything that runs here; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


def reference_file(name):
    """
    Path of a file in ../shared/adm_reference, or skip the test when the folder is not beside the clone.
    """
    path = os.path.join(ADM_REFERENCE, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not found in {ADM_REFERENCE} (the shared ADM reference data is absent)")
    return path
