"""
image_sample.py --compare: the same seeds sampled without and with the guidance flags, drawn side by side.
Runs the embedded digits model in this process, with few samples and steps.
"""

import io
import json
import os

import numpy as np
import pytest

from conftest import grid_tiles

from guided_diffusion.run import compare_picture
from guided_diffusion.run.image_output import enlarge_small

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

    # Under the panels, for the samples changed most (here all 4): the x0 predictions of the plain and the
    # perturbed pass at the step of the guided samples' own paths where they differ most (sampled again: the
    # same batch gives the same samples, bit for bit).
    args = image_sample.create_argparser().parse_args(["@digits16_sample"] + FEW + ["--pag_scale", "2.0"])
    args.model_path = image_sample.EMBEDDED_MODEL
    taken = image_sample.perturbed_predictions(args, compare_picture.most_changed(plain, guided))
    np.testing.assert_array_equal(taken.final, guided)
    assert taken.indices == [0, 1, 2, 3] and taken.steps == 3 and len(taken.differences) == 3
    assert taken.difference == max(taken.differences) > 0.5 and taken.step == taken.differences.index(taken.difference)
    assert taken.t == [999, 500, 0][taken.step]
    assert taken.difference == np.abs(taken.plain.astype(int) - taken.perturbed).mean()

    picture = np.asarray(Image.open(io.BytesIO((out / "compare.png").read_bytes())).convert("RGB"))
    titles = ["No guidance (seed 0)", f"{image_sample.describe_guidance(args)} (same seeds)"]
    image, regions = compare_picture.draw(plain, guided, titles, taken)
    np.testing.assert_array_equal(picture, image)
    for key, images in (("left", plain), ("right", guided)):
        np.testing.assert_array_equal(
            grid_tiles(picture, regions[key], 64, compare_picture.PADDING), enlarge_small(images)
        )
    rows = grid_tiles(picture, regions["predictions"], 64, 2)
    np.testing.assert_array_equal(rows[:8], enlarge_small(np.concatenate([taken.plain, taken.perturbed])))

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


def test_the_embedded_default_without_guidance_just_samples(image_sample, tmp_path, capsys):
    # The embedded config turns --compare on; --pag_scale 0 turns off the guidance it would compare with.
    out = tmp_path / "plain"
    path = image_sample.main(FEW + ["--pag_scale", "0", "--out_dir", str(out)])
    assert os.path.exists(path) and "error" not in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["grid.png", "log.txt", "samples_4x16x16x3.json", "samples_4x16x16x3.npz"]


def test_unguided_and_guided_default_share_the_unguided_samples(image_sample, tmp_path, monkeypatch, capsys):
    # Without --out_dir the unguided samples go where the guided default keeps the same seeds without guidance,
    # so the second command reuses the first one's samples instead of stopping at a folder of other settings.
    monkeypatch.chdir(tmp_path)
    plain_path = image_sample.main(FEW + ["--pag_scale", "0"])
    assert plain_path == os.path.join("samples", "digits16", "baseline", "samples_4x16x16x3.npz")
    assert "into samples/digits16/baseline" in capsys.readouterr().out
    plain = (tmp_path / plain_path).read_bytes()
    guided_path = image_sample.main(FEW)
    assert guided_path == os.path.join("samples", "digits16", "samples_4x16x16x3.npz")
    assert "baseline/samples_4x16x16x3.npz is already complete" in capsys.readouterr().out
    assert (tmp_path / plain_path).read_bytes() == plain
    assert (tmp_path / "samples" / "digits16" / "compare.png").exists()


def test_the_embedded_result_is_stated_only_at_its_settings(image_sample, tmp_path, monkeypatch):
    # compare.png repeats the measured FID of the embedded config only for samples of that setting (any seed,
    # number or folder); other guidance is another setting.
    notes = []
    draw = image_sample.compare_picture.draw
    monkeypatch.setattr(
        image_sample.compare_picture, "draw", lambda *args: notes.append(args[4]) or draw(*args)
    )
    few = ["--num_samples", "2", "--batch_size", "2", "--seed", "7"]
    image_sample.main(few + ["--out_dir", str(tmp_path / "default")])
    image_sample.main(few + ["--pag_scale", "2", "--out_dir", str(tmp_path / "other")])
    assert notes == [image_sample.EMBEDDED_RESULT, ""]
