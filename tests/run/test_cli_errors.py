"""
The command-line tools outside the samplers also answer a bad flag with one `prog: error: ...` line, no usage text.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


@pytest.mark.parametrize("script, argv, expected", [
    ("evaluations/evaluator.py", ["--ref_stats", "bogus", "a.npz", "b.npz"], "argument --ref_stats: invalid choice"),
    ("evaluations/make_reference_batch.py", [], "the following arguments are required: source, out"),
    ("scripts/fetch_assets.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("scripts/reproduce.py", ["digits16_baseline", "--launcher", "bogus"], "argument --launcher: invalid choice"),
    ("scripts/merge_shards.py", [], "the following arguments are required: folder"),
    ("scripts/reproduce.py", ["digits16_baseline", "--device", "bogus:7"], "--device 'bogus:7' is not a torch device"),
])
def test_a_bad_flag_is_one_line(script, argv, expected, tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    name = os.path.basename(script)
    assert res.returncode == 2
    assert res.stderr.startswith(f"{name}: error: {expected}"), res.stderr
    assert res.stderr.count("\n") == 1 and "usage:" not in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_reproduce_refuses_a_cuda_device_this_machine_lacks(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "reproduce.py"), "digits16_baseline",
                          "--device", "cuda:0", "--results", str(tmp_path / "results")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("reproduce.py: error: --device cuda:0: CUDA is not available here"), res.stderr
    assert not (tmp_path / "results").exists()
