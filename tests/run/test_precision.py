"""
The sampling precision policy (guided_diffusion/run/precision.py): TF32 off unless --allow_tf32, deterministic kernels
with --deterministic, and the one line where PyTorch has no deterministic CUDA kernel.
"""

import os
from types import SimpleNamespace

import pytest
import torch as th

from conftest import REPO_ROOT, load_script

from guided_diffusion.run import precision, sampling_cli


@pytest.fixture
def torch_switches(monkeypatch):
    saved = (
        th.backends.cudnn.allow_tf32,
        th.backends.cuda.matmul.allow_tf32,
        th.backends.cudnn.deterministic,
        th.backends.cudnn.benchmark,
        th.are_deterministic_algorithms_enabled(),
        th.is_deterministic_algorithms_warn_only_enabled(),
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    th.backends.cudnn.allow_tf32, th.backends.cuda.matmul.allow_tf32 = saved[0], saved[1]
    th.backends.cudnn.deterministic, th.backends.cudnn.benchmark = saved[2], saved[3]
    th.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def _image_sample():
    return load_script("image_sample")


def _start(argv):
    parser = _image_sample().create_argparser()
    args = parser.parse_args(["@digits16_sample", "--out_dir", "", "--grid", ""] + argv)
    args.model_path = os.path.join(REPO_ROOT, "models", "digits16.pt")
    return args, sampling_cli.start_run(args, checkpoints={"model_path": "diffusion model"})


def test_tf32_is_off_by_default(torch_switches):
    # PyTorch's own default lets cuDNN convolutions run in TF32.
    th.backends.cudnn.allow_tf32 = True
    th.backends.cuda.matmul.allow_tf32 = True
    args, _ = _start([])
    assert args.allow_tf32 is False and args.deterministic is False
    assert th.backends.cudnn.allow_tf32 is False and th.backends.cuda.matmul.allow_tf32 is False
    assert not th.are_deterministic_algorithms_enabled()


def test_allow_tf32_flag(torch_switches):
    _start(["--allow_tf32", "True"])
    assert th.backends.cudnn.allow_tf32 is True and th.backends.cuda.matmul.allow_tf32 is True


def test_deterministic_flag(torch_switches, monkeypatch):
    _start(["--deterministic", "True"])
    assert th.are_deterministic_algorithms_enabled() and th.is_deterministic_algorithms_warn_only_enabled()
    assert th.backends.cudnn.deterministic is True and th.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # A workspace the user set stays.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    precision.apply_precision_policy(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_not_deterministic_note():
    reason = "the gaussian_blur operator"
    assert precision.not_deterministic_note(True, "cpu", reason) is None
    assert precision.not_deterministic_note(False, "cuda:0", reason) is None
    assert precision.not_deterministic_note(True, "cuda:1", None) is None
    assert precision.not_deterministic_note(True, "cuda:1", reason) == (
        "--deterministic: the gaussian_blur operator backpropagates through reflection padding, which has no "
        "deterministic CUDA kernel in PyTorch, so reruns of this run can differ in the last bits"
    )


def test_dps_names_its_reflection_padding(capsys):
    inverse = load_script("inverse_sample")
    from guided_diffusion.methods.inverse import create_operator

    args = SimpleNamespace(task="gaussian_blur", sag_scale=0.0, pag_scale=0.0, pag_perturbation="identity",
                           deterministic=True)
    blur = inverse.reflection_pad_backward(args, create_operator("gaussian_blur", kernel_size=5, intensity=1.0))
    assert blur == "the gaussian_blur operator"
    args.task = "inpainting"
    args.sag_scale = 0.5
    assert inverse.reflection_pad_backward(args, object()) == "the guidance's Gaussian blur"
    args.sag_scale = 0.0
    assert inverse.reflection_pad_backward(args, object()) is None

    run = SimpleNamespace(device=th.device("cuda", 0), comm=SimpleNamespace(rank=0), notes=[])
    sampling_cli.say_if_not_deterministic(run, args, blur)
    assert capsys.readouterr().out.startswith("--deterministic: the gaussian_blur operator backpropagates")
    run.device = th.device("cpu")
    sampling_cli.say_if_not_deterministic(run, args, blur)
    assert capsys.readouterr().out == ""
