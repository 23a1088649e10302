"""
FD_DINOv2's feature network (evaluations/dinov2.py): its features against facebookresearch/dinov2's own model behind
EDM2's own DINOv2 detector (tests/evaluations/dinov2_golden.pt, written by tests/evaluations/make_dinov2_golden.py), the published
checkpoint's layout, and the network as the evaluator, make_reference_batch.py and fetch_assets.py use it.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

import evaluations.dinov2 as dinov2
from evaluations import evaluator as evaluator_cli
from evaluations import make_reference_batch as make_ref_cli
from evaluations.feature_nets import embed_batch, load_feature_net
from guided_diffusion.fetch import asset_checks
from guided_diffusion.common import assets

from conftest import REPO_ROOT
from error_bounds import FLOAT32_U, probabilistic_bound
from make_dinov2_golden import SMALL, images, state_sha256

GOLDEN = torch.load(f"{REPO_ROOT}/tests/evaluations/dinov2_golden.pt", weights_only=True)
# The tolerance. It lies above float32 rounding of this network: its longest chain of roundings is the
# 588-tap patch projection, then per block the width-64 products of qkv, proj and fc1, the 257-token attention sum
# and fc2's 256-wide product (about 2,100 roundings; their probabilistic bound from tests/error_bounds.py is checked
# against it below), while a wrong resize, positional offset or normalising constant moves the features by 5e-4 or
# more.
ROUNDINGS = 588 + 2 * (3 * 64 + 257 + 256 + 64)
REL_TOL = 1e-4


def small_net(seed=0):
    return dinov2.random_dinov2_feature_net(seed, SMALL)


def relative_error(ours, ref):
    return ((ours - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def test_golden_weights_are_the_ones_it_was_made_with():
    # The random weights are regenerated here; the same stream as when the golden was written.
    assert GOLDEN["shape"] == dict(SMALL.__dict__)
    assert state_sha256(dinov2.random_dinov2_state_dict(SMALL, GOLDEN["weights_seed"])) == GOLDEN["weights_sha256"]


@pytest.mark.parametrize("batch", ["256", "64"])
def test_features_equal_dinov2_behind_edm2(batch):
    golden = GOLDEN["batches"][batch]
    x = images(GOLDEN["image_seed"], golden["n"], golden["size"])
    assert hashlib.sha256(x.tobytes()).hexdigest() == golden["images_sha256"]
    pool, spatial = embed_batch(small_net(GOLDEN["weights_seed"]), x, "cpu")  # uint8 NHWC, as the evaluator feeds it
    assert spatial is None and pool.shape == (golden["n"], SMALL.embed_dim)
    assert relative_error(torch.from_numpy(pool), golden["features"]) <= REL_TOL
    assert probabilistic_bound(ROUNDINGS, FLOAT32_U, pool.size) < REL_TOL


def test_the_positional_grid_is_resized_with_the_hub_offset():
    # 224 / 14 = 16 patches a side from the stored 37: factors (16 + 0.1) / 37, not an output size of 16.
    vit = small_net().vit
    table = vit.position_embedding(16, 16)
    assert table.shape == (1, 1 + 16 * 16, SMALL.embed_dim)
    assert torch.equal(table[:, 0], vit.pos_embed[:, 0])
    by_size = torch.nn.functional.interpolate(
        vit.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic"
    ).permute(0, 2, 3, 1).reshape(1, 256, -1)
    assert (table[:, 1:] - by_size).abs().max() > 1e-3
    assert vit.position_embedding(37, 37) is vit.pos_embed


def hub_vitl14_shapes():
    # As dinov2's hub builds dinov2_vitl14: vit_large (width 1024, 24 blocks, MLP 4096) at img_size 518 with
    # 14-pixel patches (1 + 37 * 37 positions), LayerScale (init_values 1.0), block_chunks 0 (blocks.N), no
    # register tokens; head is an Identity (no parameters).
    d, hidden = 1024, 4096
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1370, d), "mask_token": (1, d),
              "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,)}
    for i in range(24):
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "norm2.weight": (d,),
                 "norm2.bias": (d,), "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
                 "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
    return shapes


def test_vitl14_has_exactly_the_published_keys_and_shapes():
    ours = dinov2.vitl14_state_shapes()  # built on the meta device
    assert len(ours) == 343 and ours == hub_vitl14_shapes()


@pytest.fixture
def small_weights(tmp_path, monkeypatch):
    """A file in the published format for the small ViT, which the loaders then take for ViT-L/14."""
    monkeypatch.setattr(dinov2, "VITL14", SMALL)
    path = tmp_path / dinov2.WEIGHTS_FILENAME
    torch.save(dinov2.random_dinov2_state_dict(SMALL, 0), path)
    return path


def test_load_feature_net_dinov2(small_weights):
    net = load_feature_net("dinov2", device="cpu", dinov2_path=str(small_weights))
    assert net.fd_label == "FD_DINOv2" and net.name.startswith("dinov2-vitl14:")
    x = images(GOLDEN["image_seed"], 3, 256)
    pool, _ = embed_batch(net, x, "cpu")
    assert relative_error(torch.from_numpy(pool), GOLDEN["batches"]["256"]["features"]) <= REL_TOL


def test_a_file_of_another_layout_is_one_line(small_weights, tmp_path):
    state = torch.load(small_weights, weights_only=True)
    state["blocks.0.ls1.weight"] = state.pop("blocks.0.ls1.gamma")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(dinov2.DINOv2WeightsError) as err:
        load_feature_net("dinov2", dinov2_path=str(bad))
    message = str(err.value)
    assert "\n" not in message and "1 missing (blocks.0.ls1.gamma)" in message and "1 unexpected" in message


def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(dinov2.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as exit_info:
        evaluator_cli.main(["ref.npz", "sample.npz", "--feature_net", "dinov2", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"fetch it with `python scripts/fetch_assets.py {dinov2.WEIGHTS_FILENAME}`" in err


def write_batch(path, arr):
    np.savez(path, arr_0=arr)
    return str(path)


def test_evaluator_reports_fd_dinov2_and_uses_stored_dinov2_statistics(small_weights, tmp_path, capsys):
    rng = np.random.RandomState(3)
    ref = write_batch(tmp_path / "ref_images.npz", rng.randint(0, 256, (6, 32, 32, 3)).astype(np.uint8))
    sample = write_batch(tmp_path / "sample.npz", rng.randint(0, 256, (5, 32, 32, 3)).astype(np.uint8))
    stored = str(tmp_path / "ref.npz")
    make_ref_cli.main([ref, stored, "--feature_net", "dinov2", "--dinov2_path", str(small_weights),
                       "--device", "cpu", "--batch_size", "4"])
    with np.load(stored) as batch:
        assert str(batch["stats_feature_net"]).startswith("dinov2-vitl14:") and batch["mu"].shape == (64,)
    capsys.readouterr()
    argv = [stored, sample, "--feature_net", "dinov2", "--dinov2_path", str(small_weights), "--device", "cpu",
            "--no_cache", "--json", str(tmp_path / "out.json")]
    evaluator_cli.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads((tmp_path / "out.json").read_text())
    assert lines[1] == f"FD_DINOv2: {results['fid']}" and results["fd_label"] == "FD_DINOv2"
    assert lines[0] == "Inception Score: n/a" and lines[2] == "sFID: n/a"  # no classifier head, no spatial features
    assert lines[-1] == f"Features: every figure above from {results['feature_net']}'s features (FD_DINOv2)"
    assert results["ref_stats"] == "stored"


def test_fetch_entry_for_the_weights(small_weights, tmp_path):
    asset = assets.find(dinov2.WEIGHTS_FILENAME)
    assert asset.url == dinov2.WEIGHTS_URL
    assert asset.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    assert asset.folder == "torch_hub" and assets.GROUPS["dinov2"] == [asset.name]
    assert asset_checks.verify(asset, str(small_weights)).startswith("the keys and shapes")
    state = torch.load(small_weights, weights_only=True)
    del state["norm.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(asset_checks.VerificationError, match="1 missing \\(norm.bias\\)"):
        asset_checks.verify(asset, str(tmp_path / "short.pth"))


def test_statistics_recording_no_network_are_not_taken_for_dinov2s(small_weights, tmp_path, capsys):
    # ADM's reference batches store Inception statistics without naming the network: FD_DINOv2 recomputes them.
    rng = np.random.RandomState(4)
    ref = tmp_path / "adm_style.npz"
    np.savez(ref, arr_0=rng.randint(0, 256, (6, 32, 32, 3)).astype(np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048))
    sample = write_batch(tmp_path / "sample.npz", rng.randint(0, 256, (5, 32, 32, 3)).astype(np.uint8))
    evaluator_cli.main([str(ref), sample, "--feature_net", "dinov2", "--dinov2_path", str(small_weights),
                        "--device", "cpu", "--no_cache"])
    captured = capsys.readouterr()
    assert "record no feature network, so they are taken to be the FID Inception's" in captured.err
    assert "Statistics: reference computed from its 6 images" in captured.out.splitlines()
