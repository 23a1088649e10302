"""
The samplers' non-finite guard: ancestral, DDIM and DPS sampling stop at the first step that gives NaN or Inf,
with one line naming the step, the timestep and the guidance, and the scripts write nothing from such a batch.
"""

import os

import numpy as np
import pytest
import torch as th

from guided_diffusion.methods.inverse import create_operator, dps_sample_loop
from guided_diffusion.common.nonfinite import NonFiniteSampleError
from guided_diffusion.common.random_streams import batch_streams
from guided_diffusion.script_util import create_gaussian_diffusion

from conftest import tiny_flags
from test_sampling_scripts import ckpt  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class _NaNAt:
    """
    A toy model (eps = 0.3 x) that returns NaN in batch row `row` once the model's timestep reaches `timestep`.
    """

    def __init__(self, timestep, row=1):
        self.timestep, self.row = timestep, row

    def __call__(self, x, t, **kwargs):
        out = 0.3 * x
        if int(t[0]) <= self.timestep:
            out = out.clone()
            out[self.row] = float("nan")
        return out

    def describe(self):
        return "toy guidance"


@pytest.mark.parametrize("use_ddim", [False, True])
def test_sampling_loops_stop_at_the_first_non_finite_step(use_ddim):
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="10")
    loop = diffusion.ddim_sample_loop_progressive if use_ddim else diffusion.p_sample_loop_progressive
    # The respaced steps visit timesteps 99, 88, ..., 0; the model sees the original ones and fails from 55 on.
    steps = []
    with pytest.raises(NonFiniteSampleError) as stopped:
        for out in loop(_NaNAt(55), (3, 3, 4, 4), noise=th.zeros(3, 3, 4, 4)):
            steps.append(out)
    # No step with NaN is ever handed out: 99, 88, 77, 66 went through, 55 stopped.
    assert len(steps) == 4 and all(th.isfinite(out["sample"]).all() for out in steps)
    message = str(stopped.value)
    assert "\n" not in message
    assert "step 5 of 10 (timestep 55) gave NaN/Inf in 1 of 3 samples (batch row 1)" in message
    assert "guidance: toy guidance" in message


def test_guard_names_sample_indices_and_classifier_guidance():
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="10")
    with batch_streams(0, [40, 41, 42]), pytest.raises(NonFiniteSampleError) as stopped:
        diffusion.p_sample_loop(_NaNAt(99, row=2), (3, 3, 4, 4), cond_fn=lambda x, t, **kw: th.zeros_like(x))
    assert "step 1 of 10 (timestep 99)" in str(stopped.value)
    assert "(sample 42)" in str(stopped.value)
    assert "classifier guidance" in str(stopped.value)


def test_dps_loop_stops_at_the_first_non_finite_step():
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
    op = create_operator("super_resolution", in_shape=(2, 3, 8, 8), scale_factor=2)
    noise = th.randn(2, 3, 8, 8, generator=th.Generator().manual_seed(0))
    measurement = op.forward(noise)
    with pytest.raises(NonFiniteSampleError) as stopped:
        dps_sample_loop(diffusion, _NaNAt(50, row=0), noise, measurement, op, 0.5)
    assert str(stopped.value).startswith("DPS sampling stopped: step 3 of 5 (timestep 50)")


def test_official_random_mask_nan_stops_the_script_and_writes_nothing(image_sample, ckpt, tmp_path, capsys):
    # The official attention_mask masks each logit with probability drop_rate, so a whole row of the tiny model's
    # 64-token (8x8) maps is masked with probability 0.99^64 (0.53): its softmax is NaN at the first step.
    out_dir = tmp_path / "run"
    flags = dict(model_path=ckpt.uncond, num_samples=4, batch_size=2, seed=0, out_dir=out_dir, pag_scale=3.0,
                 pag_layers="all", pag_perturbation="mask", pag_drop_rate=0.99)
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(tiny_flags(**flags))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.count(": error: ") == 1
    line = next(line for line in err.splitlines() if ": error: " in line)
    assert "sampling stopped: step 1 of 5 (timestep" in line
    assert "perturbation mask (drop_rate=0.99, retain_diag=False)" in line
    assert "--pag_retain_diag" in line
    written = [name for _, _, files in os.walk(out_dir) for name in files]
    assert not [name for name in written if name.endswith(".npz")], written
    # With the diagonal retained no row is ever fully masked: the same run finishes, every image finite.
    done = image_sample.main(tiny_flags(**dict(flags, out_dir=tmp_path / "kept"), pag_retain_diag=True))
    with np.load(done) as data:
        assert data["arr_0"].shape == (4, 32, 32, 3)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_guarded_loop_equals_the_bare_steps_bit_for_bit(use_ddim):
    # The guard only reads: a finite run is the chain of the diffusion's own steps, unchanged.
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
    model = _NaNAt(-1)
    x_T = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(1))
    draws = [th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(2 + k)) for k in range(5)]
    feed = iter(draws)
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    guarded = loop(model, (2, 3, 4, 4), noise=x_T, noise_fn=lambda x: next(feed))
    step = diffusion.ddim_sample if use_ddim else diffusion.p_sample
    img = x_T
    for k, i in enumerate(range(4, -1, -1)):
        img = step(model, img, th.tensor([i, i]), noise_fn=lambda x: draws[k])["sample"]
    assert th.equal(guarded, img)
