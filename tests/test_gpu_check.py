"""
The prepared GPU check (benchmarks/gpu_check.sh) parses, and its Python parts start and refuse cleanly without CUDA.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch as th

from conftest import REPO_ROOT


def _run(*command):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not on PATH")
def test_gpu_check_script_parses():
    res = _run("bash", "-n", "benchmarks/gpu_check.sh")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", ["benchmarks/gpu_numerics.py", "benchmarks/sampling_throughput.py"])
def test_python_parts_have_help(script):
    res = _run(sys.executable, script, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout


@pytest.mark.skipif(th.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_the_check_says_so(tmp_path):
    res = _run("bash", "benchmarks/gpu_check.sh", str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "gpu_check: no CUDA device"
    res = _run(sys.executable, "benchmarks/gpu_numerics.py", "--out", str(tmp_path / "r.json"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        "error: --device cuda: these checks need CUDA, which is not available here"
    )
    assert not os.path.exists(tmp_path / "r.json")
