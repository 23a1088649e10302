"""
image_sample.py --compare: the same seeds sampled without and with the guidance flags, drawn side by side.
Runs the embedded digits model in this process, with few samples and steps.
"""

import io
import json
import os

import numpy as np
import pytest

from guided_diffusion.run.image_output import enlarge_small, image_grid

pytestmark = pytest.mark.usefixtures("one_thread")

FEW = ["--num_samples", "4", "--batch_size", "4", "--timestep_respacing", "3"]


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAG_ADM_DIGEST_DIR", str(tmp_path / "digests"))


def load(path):
    with np.load(path) as data:
        return data["arr_0"]


def test_compare_draws_the_plain_run_beside_the_guided_one(image_sample, tmp_path):
    from PIL import Image

    out = tmp_path / "pag"
    guided_path = image_sample.main(FEW + ["--pag_scale", "2.0", "--out_dir", str(out), "--compare", "True"])
    plain_path = image_sample.main(FEW + ["--pag_scale", "0", "--compare", "False", "--out_dir", str(tmp_path / "plain")])
    guided, plain = load(guided_path), load(plain_path)
    baseline = load(out / "baseline" / os.path.basename(plain_path))
    # The baseline is the plain run of the same seeds, bit for bit; the guidance changes it.
    np.testing.assert_array_equal(baseline, plain)
    assert np.abs(guided.astype(int) - plain).mean() > 1

    picture = np.asarray(Image.open(io.BytesIO((out / "compare.png").read_bytes())).convert("RGB"))
    left, right = (image_grid(enlarge_small(x), ncol=4) for x in (plain, guided))
    top = 18  # the titles' height
    np.testing.assert_array_equal(picture[top : top + left.shape[0], : left.shape[1]], left)
    np.testing.assert_array_equal(picture[top : top + right.shape[0], -right.shape[1]:], right)

    # Under the guided panel: the x0 predictions of the plain and the perturbed pass at one step of the guided
    # samples' own paths (sampled again: the same batch gives the same samples, bit for bit).
    args = image_sample.create_argparser().parse_args(["@digits16_sample"] + FEW + ["--pag_scale", "2.0"])
    args.model_path = image_sample.EMBEDDED_MODEL
    taken = image_sample.perturbed_predictions(args)
    np.testing.assert_array_equal(taken.final, guided)
    assert (taken.step, taken.steps, taken.t) == (0, 3, 999)
    assert np.abs(taken.plain.astype(int) - taken.perturbed).mean() > 0.5
    strip = image_grid(enlarge_small(np.concatenate([taken.plain, taken.perturbed])), ncol=4)
    np.testing.assert_array_equal(picture[-strip.shape[0]:, -strip.shape[1]:], strip)

    # --compare is not a sampling setting: the guided run's record does not carry it, so rerunning the
    # command without it finds the finished samples.
    with open(os.path.splitext(guided_path)[0] + ".json") as f:
        assert "compare" not in json.load(f)["flags"]
    assert image_sample.main(FEW + ["--pag_scale", "2.0", "--compare", "False", "--out_dir", str(out)]) == guided_path


def test_compare_without_guidance_is_one_error_line(image_sample, tmp_path, capsys):
    out = tmp_path / "none"
    with pytest.raises(SystemExit) as exit_info:
        image_sample.main(FEW + ["--pag_scale", "0", "--out_dir", str(out), "--compare", "True"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: --compare needs guidance to compare with (e.g. --pag_scale 1.0); none is on")
    assert not out.exists()
