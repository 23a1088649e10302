"""
Autoguidance on every sampler (image_sample DDPM and DDIM with --compare, classifier_sample with classifier
guidance, super_res_sample, inverse_sample's DPS): the guide equal to the main model samples what the plain model
samples, a weaker guide changes the samples, and a bad --ag_model_path or --ag_model_flags is one error line with
no output folder.
"""

import os

import numpy as np
import pytest
import torch as th

from conftest import flags, load_script, randomize_zero_params, tiny_flags

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDE = "--channel_mult 1,1,1"


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PAG_ADM_DIGEST_DIR", str(tmp_path / "digests"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_sampling_scripts import TINY_CLASSIFIER, _save_model
    from guided_diffusion.script_util import classifier_defaults, create_classifier

    folder = tmp_path_factory.mktemp("ag")
    out = dict(
        main=_save_model(folder / "main.pt", 1),
        guide=_save_model(folder / "guide.pt", 7, channel_mult="1,1,1"),
        main64=_save_model(folder / "main64.pt", 3, image_size=64),
        guide64=_save_model(folder / "guide64.pt", 8, image_size=64, learn_sigma=True),
    )
    th.manual_seed(4)
    classifier_args = classifier_defaults()
    classifier_args.update(image_size=64, **TINY_CLASSIFIER)
    classifier = create_classifier(**classifier_args)
    randomize_zero_params(classifier, 4)
    th.save(classifier.state_dict(), folder / "classifier.pt")
    out["classifier"] = str(folder / "classifier.pt")
    out["classifier_flags"] = TINY_CLASSIFIER
    return out


def _run(script, argv):
    from test_sampling_scripts import run_main

    return run_main(script, argv)


def test_image_sample_with_autoguidance(files, tmp_path):
    image_sample = load_script("image_sample")
    for use_ddim in (False, True):
        common = dict(model_path=files["main"], num_samples=3, batch_size=3, seed=2, use_ddim=use_ddim)
        plain = _run(image_sample, tiny_flags(out_dir=tmp_path / f"plain{use_ddim}", **common))
        same = _run(image_sample, tiny_flags(out_dir=tmp_path / f"same{use_ddim}", ag_scale=2.0,
                                             ag_model_path=files["main"], **common))
        np.testing.assert_array_equal(same["arr_0"], plain["arr_0"])
        weak = _run(image_sample, tiny_flags(out_dir=tmp_path / f"weak{use_ddim}", ag_scale=2.0,
                                             ag_model_path=files["guide"], **common) + [f"--ag_model_flags={GUIDE}"])
        assert np.abs(weak["arr_0"].astype(int) - plain["arr_0"]).mean() > 0.5
    # --compare samples the same seeds without guidance beside it.
    out = tmp_path / "compare"
    image_sample.main(tiny_flags(out_dir=out, model_path=files["main"], num_samples=2, batch_size=2, ag_scale=1.0,
                                 ag_model_path=files["guide"], ag_model_flags=GUIDE, compare=True))
    assert (out / "compare.png").is_file() and (out / "baseline").is_dir()
    assert "autoguidance: scale 1.0 (w = 2)" in (out / "log.txt").read_text()


def test_classifier_sample_combines_autoguidance_with_classifier_guidance(files, tmp_path):
    classifier_sample = load_script("classifier_sample")
    common = dict(
        image_size=64, model_path=files["main64"], num_samples=2, batch_size=2, seed=3,
        classifier_path=files["classifier"], ag_model_path=files["guide64"], **files["classifier_flags"],
    )
    # The guide may learn sigma where the main model does not: only its eps is used.
    guide = "--learn_sigma True"
    both = _run(classifier_sample, tiny_flags(out_dir=tmp_path / "cg", classifier_scale=10.0, ag_scale=2.0, **common)
                + [f"--ag_model_flags={guide}"])
    ag_only = _run(classifier_sample, tiny_flags(out_dir=tmp_path / "ag", classifier_scale=0.0, ag_scale=2.0, **common)
                   + [f"--ag_model_flags={guide}"])
    cg_only = _run(classifier_sample, tiny_flags(out_dir=tmp_path / "plain", classifier_scale=10.0, ag_scale=0.0,
                                                 **{**common, "ag_model_path": ""}))
    assert np.abs(both["arr_0"].astype(int) - ag_only["arr_0"]).mean() > 0.5
    assert np.abs(both["arr_0"].astype(int) - cg_only["arr_0"]).mean() > 0.5
    np.testing.assert_array_equal(both["arr_1"], cg_only["arr_1"])


def test_super_res_sample_with_the_main_model_as_its_guide(tmp_path):
    from test_sampling_scripts import SR_TINY
    from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

    th.manual_seed(5)
    model, _ = sr_create_model_and_diffusion(**{**sr_model_and_diffusion_defaults(), **SR_TINY})
    randomize_zero_params(model, 5)
    th.save(model.state_dict(), tmp_path / "sr.pt")
    np.savez(tmp_path / "base.npz", np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    super_res_sample = load_script("super_res_sample")
    values = dict(SR_TINY, model_path=tmp_path / "sr.pt", base_samples=tmp_path / "base.npz", num_samples=2,
                  batch_size=2)
    plain = _run(super_res_sample, flags(dict(values, out_dir=tmp_path / "plain")))
    same = _run(super_res_sample, flags(dict(values, out_dir=tmp_path / "ag", ag_scale=1.5,
                                             ag_model_path=tmp_path / "sr.pt")))
    np.testing.assert_array_equal(same["arr_0"], plain["arr_0"])


def test_dps_with_autoguidance(tmp_path):
    from test_inverse import SCRIPT_MODEL
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    inverse_sample = load_script("inverse_sample")
    paths = {}
    for name, seed, extra in (("main", 0, {}), ("guide", 1, dict(num_res_blocks=2))):
        th.manual_seed(seed)
        model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **SCRIPT_MODEL, **extra})
        randomize_zero_params(model, seed)
        paths[name] = tmp_path / f"{name}.pt"
        th.save(model.state_dict(), paths[name])
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images)
    common = dict(SCRIPT_MODEL, model_path=paths["main"], data_dir=tmp_path / "data.npz", task="super_resolution",
                  scale_factor=2, dps_scale=0.5, num_samples=2, batch_size=2, grid="", seed=4)

    def run(name, **values):
        path = inverse_sample.main(flags(dict(common, out_dir=tmp_path / name, **values)))
        with np.load(path) as data:
            return data["arr_0"]

    plain = run("plain")
    np.testing.assert_array_equal(run("same", ag_scale=2.0, ag_model_path=paths["main"]), plain)
    weak = run("weak", ag_scale=2.0, ag_model_path=paths["guide"], ag_model_flags="--num_res_blocks 2")
    assert np.abs(weak.astype(int) - plain).mean() > 0.5


@pytest.mark.parametrize("bad, message", [
    (dict(ag_scale=1.0), "--ag_model_path is required: pass the autoguidance guide model checkpoint"),
    (dict(ag_scale=1.0, ag_model_path="no/such/guide.pt"), "--ag_model_path 'no/such/guide.pt' (the autoguidance guide model checkpoint, a .pt file): no such file"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE"), "--ag_model_path 'GUIDE' does not fit the guide built from the main model's flags (--ag_model_flags is empty): give the flags the guide was trained with in --ag_model_flags (flags or @FILE); most likely wrong: "),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", ag_model_flags="--num_res_blocks 2"), "does not fit the guide built from --ag_model_flags '--num_res_blocks 2'"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", ag_model_flags="--num_channels 48"), "--ag_model_flags: --num_channels 48 does not fit the architecture"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", ag_model_flags="--use_ddim True"), "--ag_model_flags: --use_ddim True are not the model's architecture flags"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", ag_model_flags="--image_size 64"), "--ag_model_flags gives --image_size 64, the main model has 32"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", pag_scale=2.0), "--ag_scale cannot be combined with --pag_scale"),
    (dict(ag_scale=1.0, ag_model_path="GUIDE", ag_model_flags=GUIDE, ag_sigma_interval="0,0.01"), "--ag_sigma_interval '0,0.01' gives scale 0 at every one of the 5 sampled steps"),
])
def test_bad_autoguidance_flags_are_one_line(files, tmp_path, capsys, bad, message):
    image_sample = load_script("image_sample")
    bad = {k: (files["guide"] if v == "GUIDE" else v) for k, v in bad.items()}
    message = message.replace("GUIDE", files["guide"])
    values = dict(model_path=files["main"], num_samples=2, batch_size=2, out_dir=tmp_path / "run")
    values.update(bad)
    guide_flags = values.pop("ag_model_flags", None)
    argv = tiny_flags(**values) + ([f"--ag_model_flags={guide_flags}"] if guide_flags is not None else [])
    with pytest.raises(SystemExit) as rejected:
        image_sample.main(argv)
    assert rejected.value.code == 2
    err = capsys.readouterr().err
    assert err.count(": error: ") == 1 and "usage:" not in err and "Traceback" not in err
    assert err.endswith("\n") and err.split(": error: ", 1)[1].count("\n") == 1  # one line
    assert message in err, err
    assert not os.path.exists(tmp_path / "run")
