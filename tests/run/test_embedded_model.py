"""
The embedded default: shipped digits model, its data, its feature network, and `image_sample.py` with no flags.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, load_script

from guided_diffusion import script_util as su
from guided_diffusion.run.flag_files import config_flags, resolve_config

MODEL = os.path.join(REPO_ROOT, "models", "digits16.pt")
DATASET = os.path.join(REPO_ROOT, "datasets", "digits16.npz")


def embedded_flags():
    parser = load_script("image_sample").create_argparser()
    return parser.parse_args(["@digits16_model"])


def test_shipped_checkpoint_loads_strict_with_its_config():
    args = embedded_flags()
    model, _ = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults()))
    model.load_state_dict(torch.load(MODEL, map_location="cpu"), strict=True)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "AttentionBlock"]
    # Attention at 8x8 and 4x4 in the encoder, the middle and the decoder: PAG has blocks to perturb.
    assert "middle_block.1" in names and any(n.startswith("input_blocks") for n in names)
    assert os.path.getsize(MODEL) < 8 * 2**20


def test_model_card_record_matches_the_training_config():
    with open(os.path.splitext(MODEL)[0] + ".json") as f:
        record = json.load(f)
    train = config_flags(resolve_config("digits16_train"))
    assert record["steps"] == int(train["lr_anneal_steps"])
    assert record["flags"] == train
    assert np.isfinite(record["final_loss"])


@pytest.mark.parametrize(
    "argv, embedded",
    [
        ([], True),
        (["--pag_scale", "1.5", "--num_samples", "8"], True),
        (["--timestep_respacing", "50"], True),
        (["--model_path", "x.pt"], False),
        (["--image_size", "64"], False),
        (["@digits16_model"], False),
    ],
)
def test_when_the_embedded_model_is_used(argv, embedded):
    assert load_script("image_sample").uses_embedded_model(argv) is embedded


def test_image_sample_without_flags_uses_the_embedded_model(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO_ROOT, "scripts", "image_sample.py"), "--num_samples", "4",
           "--batch_size", "4", "--timestep_respacing", "4", "--out_dir", str(out), "--grid", str(out / "g.png")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedded 16x16 digits model" in result.stdout
    # The default is the regime where PAG helps this model (docs/results.md): DDIM, PAG s=3 on the middle block,
    # and the same seeds without guidance drawn beside it.
    assert "with PAG: scale 3.0, layers 'middle'" in result.stdout
    with open(out / "samples_4x16x16x3.json") as f:
        flags = json.load(f)["flags"]
    assert flags["use_ddim"] is True and flags["pag_scale"] == 3.0 and flags["pag_layers"] == "middle"
    with np.load(out / "samples_4x16x16x3.npz") as data, np.load(out / "baseline" / "samples_4x16x16x3.npz") as plain:
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert "arr_1" not in data
        assert plain["arr_0"].shape == data["arr_0"].shape and not np.array_equal(plain["arr_0"], data["arr_0"])
    for picture in ("g.png", "compare.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_guidance_flags_on_the_embedded_model_are_one_line(tmp_path, capsys):
    # The embedded model's banner describes the guidance, so the flags are checked before it.
    with pytest.raises(SystemExit) as stopped:
        load_script("image_sample").main(["--pag_scale", "1", "--pag_perturbation", "mask", "--out_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.err.count("\n") == 1
    assert "error: --pag_perturbation mask needs --pag_drop_rate" in captured.err
    assert "embedded 16x16 digits model" not in captured.out and not os.listdir(tmp_path)


def test_shipped_dataset_is_the_sklearn_digits():
    with np.load(DATASET) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    pytest.importorskip("sklearn")
    from guided_diffusion.common.digits_dataset import load_digits_images

    rebuilt, rebuilt_labels = load_digits_images(16)
    np.testing.assert_array_equal(rebuilt, images)
    np.testing.assert_array_equal(rebuilt_labels, labels)


def test_train_embedded_model_needs_no_scikit_learn(tmp_path):
    # The dataset ships in datasets/; retraining must work where scikit-learn cannot be imported.
    blocker = tmp_path / "blocked"
    (blocker / "sklearn").mkdir(parents=True)
    (blocker / "sklearn" / "__init__.py").write_text("raise ImportError('scikit-learn is blocked in this test')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), REPO_ROOT, env.get("PYTHONPATH", "")])
    out = tmp_path / "model.pt"
    res = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "train_embedded_model.py"), "--steps", "1",
         "--work_dir", str(tmp_path / "work"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    state = torch.load(out)
    assert "time_embed.0.weight" in state
    with open(tmp_path / "model.json") as f:
        assert json.load(f)["steps"] == 1


def test_digits_feature_net_classifies_the_data():
    from evaluations.digits_net import load_digits_net
    from evaluations.feature_nets import embed_batch

    net = load_digits_net()
    with np.load(DATASET) as data:
        images, labels = data["arr_0"], data["arr_1"]
    pool, spatial = embed_batch(net, images, "cpu")
    assert pool.shape == (1797, 128) and spatial.shape == (1797, 256)
    with torch.no_grad():
        predicted = net.logits(torch.from_numpy(pool)).argmax(1).numpy()
    assert (predicted == labels).mean() > 0.95
    assert net.name.startswith("digits16-")


def test_missing_feature_net_weights_name_the_file(tmp_path):
    from evaluations.digits_net import load_digits_net

    with pytest.raises(FileNotFoundError, match="train_digits_features.py"):
        load_digits_net(path=str(tmp_path / "none.pt"))
