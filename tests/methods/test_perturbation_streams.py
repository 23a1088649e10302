"""
Per-sample random streams for PAG's random perturbations (mask, drop, noise): inside random_streams.batch_streams
each sample's part of the perturbed maps comes from its own generator, so the draws, and with them the samples,
do not depend on the batch a sample lands in, the number of ranks or the way PAG batches its two branches.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion.methods import perturbations
from guided_diffusion.methods.pag import PAGGuidedModel
from guided_diffusion.common.random_streams import batch_streams, perturbation_generator, sample_generator

from conftest import REPO_ROOT, tiny_flags
from test_perturbations import batch, tiny_unet
from test_sampling_scripts import assert_nearly_equal_images, ckpt, run_main  # noqa: F401 (ckpt: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = [
    ("mask", dict(drop_rate=0.3, retain_diag=True)),
    ("drop", dict(drop_rate=0.3)),
    ("noise", dict(noise_scale=0.5)),
]


@pytest.fixture
def draws(monkeypatch):
    """
    Every random draw of a perturbation: a list (one per draw) of [rows, heads, T, T] with per-sample generators,
    of [rows * heads, T, T] without.
    """
    seen = []
    real = perturbations.AttentionPerturbation._draw

    def recording(self, weight, normal=False):
        out = real(self, weight, normal)
        rows = len(self.generators) if self.generators is not None else 1
        seen.append(out.reshape(rows, -1, *out.shape[1:]) if self.generators is not None else out)
        return out

    monkeypatch.setattr(perturbations.AttentionPerturbation, "_draw", recording)
    return seen


@pytest.mark.parametrize("kind, params", KINDS)
def test_a_samples_draws_do_not_depend_on_its_batch_or_the_pag_mode(draws, kind, params):
    model = tiny_unet()
    x, t, kwargs = batch(3)
    t = torch.full_like(t, 417)
    outputs, rows = {}, {}
    for name, indices, mode in [
        ("three", [5, 6, 7], dict()),
        ("last two", [6, 7], dict()),
        ("two passes", [5, 6, 7], dict(batched=False)),
        ("no sharing", [5, 6, 7], dict(share_prefix=False)),
    ]:
        draws.clear()
        keep = slice(3 - len(indices), None)
        guided = PAGGuidedModel(model, 2.0, "all", kind=kind, **params, **mode)
        with torch.no_grad(), batch_streams(9, indices):
            outputs[name] = guided(x[keep], t[keep], y=kwargs["y"][keep])
        rows[name] = draws[:]
    assert len(rows["three"]) == 7  # one draw per perturbed block (tiny_unet has 7 attention blocks)
    for name in ("two passes", "no sharing"):
        for a, b in zip(rows["three"], rows[name]):
            assert torch.equal(a, b), name
        torch.testing.assert_close(outputs[name], outputs["three"], rtol=0, atol=1e-5)
    for a, b in zip(rows["three"], rows["last two"]):
        assert torch.equal(a[1:], b)
    # Samples 6 and 7 are the same in either batch up to float32 rounding (the global generator drew another
    # perturbation for each batch shape).
    torch.testing.assert_close(outputs["last two"], outputs["three"][1:], rtol=0, atol=1e-5)
    # The draws are sample 6's own perturbation stream: its first block's first draw.
    expected = (torch.randn if kind == "noise" else torch.rand)(rows["three"][0].shape[1:],
                                                                generator=perturbation_generator(9, 6))
    assert torch.equal(rows["three"][0][1], expected)


def test_perturbation_streams_are_not_the_sampling_streams():
    a = torch.rand(16, generator=perturbation_generator(0, 3))
    assert not torch.equal(a, torch.rand(16, generator=sample_generator(0, 3)))
    assert not torch.equal(a, torch.rand(16, generator=perturbation_generator(0, 4)))
    assert torch.equal(a, torch.rand(16, generator=perturbation_generator(0, 3)))


def test_outside_batch_streams_the_global_generator_is_used_as_officially(draws):
    model = tiny_unet()
    x, t, kwargs = batch(2)
    guided = PAGGuidedModel(model, 2.0, "middle", kind="drop", drop_rate=0.3)
    torch.manual_seed(3)
    with torch.no_grad():
        guided(x, t, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(draws[0], torch.rand(draws[0].shape))


def test_identity_pag_is_the_same_inside_batch_streams():
    model = tiny_unet()
    x, t, kwargs = batch(3)
    guided = PAGGuidedModel(model, 2.0, "all")
    with torch.no_grad():
        outside = guided(x, t, **kwargs)
        with batch_streams(0, [0, 1, 2]):
            inside = guided(x, t, **kwargs)
    assert torch.equal(outside, inside)


DROP = dict(pag_scale=3.0, pag_layers="all", pag_perturbation="drop", pag_drop_rate=0.5)


def test_random_perturbation_samples_do_not_depend_on_the_batch_size(image_sample, ckpt, tmp_path):
    common = dict(model_path=ckpt.uncond, num_samples=4, seed=2, **DROP)
    by_four = run_main(image_sample, tiny_flags(out_dir=tmp_path / "four", batch_size=4, **common))
    by_three = run_main(image_sample, tiny_flags(out_dir=tmp_path / "three", batch_size=3, **common))
    # Equal up to the kernels' rounding for another batch shape (a level at most, rarely): the perturbation
    # draws themselves are the same (test above).
    assert_nearly_equal_images(by_four["arr_0"], by_three["arr_0"])


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not installed")
def test_random_perturbation_two_mpi_ranks_match_one_process(image_sample, ckpt, tmp_path):
    # The determinism docs/determinism.md states: same seed, batch size and thread count (one here, as mpiexec
    # gives each rank), any number of ranks: bit-identical samples.
    common = dict(model_path=ckpt.uncond, num_samples=5, batch_size=2, seed=4, **DROP)
    single = run_main(image_sample, tiny_flags(out_dir=tmp_path / "one", **common))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    command = ["mpiexec", "-n", "2", sys.executable, os.path.join(REPO_ROOT, "scripts", "image_sample.py"),
               *tiny_flags(out_dir=tmp_path / "two", **common)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "two" / "samples_5x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], single["arr_0"])
