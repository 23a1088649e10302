"""
The FID Inception-v3 (random weights: the real file is never needed), its TF1 resize, the
weights file layout and lookup, and feature-network loading.
"""

import numpy as np
import pytest
import torch

from evaluations import inception
from evaluations.feature_nets import embed_batch, load_feature_net, net_logits
from evaluations.inception import (
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    FIDInceptionV3,
    find_inception_weights,
    load_inception_state_dict,
    random_inception_feature_net,
    tf1_resize_bilinear,
)


def _tf1_resize_reference(image, out_h, out_w):
    """TensorFlow 1 ResizeBilinear (align_corners=False, no half-pixel centres), per pixel."""
    in_h, in_w = image.shape[:2]
    f32 = np.float32
    scale_y, scale_x = f32(in_h) / f32(out_h), f32(in_w) / f32(out_w)
    out = np.zeros((out_h, out_w) + image.shape[2:], np.float32)
    for y in range(out_h):
        in_y = f32(y) * scale_y
        top, bottom = int(np.floor(in_y)), min(int(np.ceil(in_y)), in_h - 1)
        y_lerp = f32(in_y - np.floor(in_y))
        for x in range(out_w):
            in_x = f32(x) * scale_x
            left, right = int(np.floor(in_x)), min(int(np.ceil(in_x)), in_w - 1)
            x_lerp = f32(in_x - np.floor(in_x))
            tl, tr = image[top, left], image[top, right]
            bl, br = image[bottom, left], image[bottom, right]
            top_v = tl + (tr - tl) * x_lerp
            bottom_v = bl + (br - bl) * x_lerp
            out[y, x] = top_v + (bottom_v - top_v) * y_lerp
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 3)), ((40, 33), (7, 9)), ((16, 20), (299, 299))])
def test_resize_matches_tf1_formula(in_hw, out_hw):
    image = np.random.default_rng(0).uniform(0, 255, size=in_hw + (3,)).astype(np.float32)
    expected = _tf1_resize_reference(image, *out_hw)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    got = tf1_resize_bilinear(x, out_hw)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_resize_samples_at_x_times_in_over_out():
    # 2x2 -> 4x4: sources 0, 0.5, 1, 1.5 (the last clamped to the edge), unlike PyTorch's
    # align_corners=False which uses half-pixel centres.
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]
    expected = [[0, 0.5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]]
    assert tf1_resize_bilinear(x, (4, 4))[0, 0].tolist() == expected
    assert tf1_resize_bilinear(x, (2, 2)) is x


# Layout of pt_inception-2015-12-05-6726825d.pth (pytorch-fid's conversion of the 2015 graph):
# every conv is `<name>.conv.weight` [out, in, kh, kw] plus BatchNorm `<name>.bn.{weight, bias,
# running_mean, running_var}` [out]; no num_batches_tracked entries; fc is 1008 x 2048 + bias.
def _mixed_a(name, cin, pool):
    return [
        (f"{name}.branch1x1", 64, cin, 1, 1), (f"{name}.branch5x5_1", 48, cin, 1, 1),
        (f"{name}.branch5x5_2", 64, 48, 5, 5), (f"{name}.branch3x3dbl_1", 64, cin, 1, 1),
        (f"{name}.branch3x3dbl_2", 96, 64, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
        (f"{name}.branch_pool", pool, cin, 1, 1),
    ]


def _mixed_c(name, c7):
    return [
        (f"{name}.branch1x1", 192, 768, 1, 1), (f"{name}.branch7x7_1", c7, 768, 1, 1),
        (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", 192, c7, 7, 1),
        (f"{name}.branch7x7dbl_1", c7, 768, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
        (f"{name}.branch7x7dbl_5", 192, c7, 1, 7), (f"{name}.branch_pool", 192, 768, 1, 1),
    ]


def _mixed_e(name, cin):
    return [
        (f"{name}.branch1x1", 320, cin, 1, 1), (f"{name}.branch3x3_1", 384, cin, 1, 1),
        (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
        (f"{name}.branch3x3dbl_1", 448, cin, 1, 1), (f"{name}.branch3x3dbl_2", 384, 448, 3, 3),
        (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
        (f"{name}.branch_pool", 192, cin, 1, 1),
    ]


CONVS = (
    [
        ("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
        ("Conv2d_2b_3x3", 64, 32, 3, 3), ("Conv2d_3b_1x1", 80, 64, 1, 1),
        ("Conv2d_4a_3x3", 192, 80, 3, 3),
    ]
    + _mixed_a("Mixed_5b", 192, 32) + _mixed_a("Mixed_5c", 256, 64) + _mixed_a("Mixed_5d", 288, 64)
    + [
        ("Mixed_6a.branch3x3", 384, 288, 3, 3), ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
        ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    ]
    + _mixed_c("Mixed_6b", 128) + _mixed_c("Mixed_6c", 160) + _mixed_c("Mixed_6d", 160)
    + _mixed_c("Mixed_6e", 192)
    + [
        ("Mixed_7a.branch3x3_1", 192, 768, 1, 1), ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
        ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
        ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    ]
    + _mixed_e("Mixed_7b", 1280) + _mixed_e("Mixed_7c", 2048)
)


def _expected_weights_layout():
    layout = {}
    for name, cout, cin, kh, kw in CONVS:
        layout[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{stat}"] = (cout,)
    layout["fc.weight"] = (1008, 2048)
    layout["fc.bias"] = (1008,)
    return layout


def test_state_dict_matches_the_pytorch_fid_weights_file_layout():
    network = FIDInceptionV3()
    got = {
        k: tuple(v.shape)
        for k, v in network.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    expected = _expected_weights_layout()
    assert len(expected) == 472
    assert got == expected
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head (3,326,696) and a
    # 1000-way fc; without aux and with 1008 classes that is 23,850,960.
    assert sum(p.numel() for p in network.parameters()) == 23_850_960
    for bn in (m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert bn.eps == 0.001
    assert (network.Mixed_7b.pool, network.Mixed_7c.pool) == ("avg", "max")


def test_weights_file_loads_strict_without_num_batches_tracked():
    source = FIDInceptionV3()
    torch.nn.init.normal_(source.Mixed_6d.branch1x1.bn.running_mean)
    # As in the converted file: a plain dict, no _metadata, no num_batches_tracked.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    network = load_inception_state_dict(FIDInceptionV3(), state)
    for key, value in state.items():
        assert torch.equal(network.state_dict()[key], value), key

    with pytest.raises(ValueError, match=f"not the {WEIGHTS_FILENAME} weights .*: 1 keys do not match the 472 expected: 1 unexpected \\(AuxLogits.fc.weight\\)$"):
        load_inception_state_dict(FIDInceptionV3(), {**state, "AuxLogits.fc.weight": torch.zeros(1)})


def test_average_pools_ignore_padding():
    ones = torch.ones(1, 1, 4, 4)
    assert torch.equal(inception._avg_pool_3x3(ones), ones)


def test_missing_weights_give_one_message_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    hub_file = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        find_inception_weights()
    message = str(info.value)
    for part in (WEIGHTS_FILENAME, "--inception_path", WEIGHTS_ENV, str(hub_file), "pytorch-fid"):
        assert part in message
    with pytest.raises(FileNotFoundError, match=f"--inception_path: {tmp_path}/nope.pth"):
        load_feature_net("inception", inception_path=str(tmp_path / "nope.pth"))

    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert find_inception_weights() == str(hub_file)
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(WEIGHTS_ENV, str(env_file))
    assert find_inception_weights() == str(env_file)
    assert find_inception_weights(str(hub_file)) == str(hub_file)


@pytest.fixture(scope="module")
def inception_run():
    net = random_inception_feature_net(seed=0, fast=False)  # the reference network, hooked
    taps = {}
    hooks = [
        net.network.Conv2d_1a_3x3.register_forward_hook(lambda m, i, o: taps.update(input=i[0])),
        net.network.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.update(b1=o)),
        net.network.Mixed_7c.register_forward_hook(lambda m, i, o: taps.update(last=o)),
    ]
    images = np.random.default_rng(1).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    pool, spatial = embed_batch(net, images, "cpu")
    for hook in hooks:
        hook.remove()
    return net, images, pool, spatial, taps


def test_inception_feature_shapes(inception_run):
    net, _, pool, spatial, taps = inception_run
    assert pool.shape == (2, 2048) and pool.dtype == np.float32
    assert spatial.shape == (2, 17 * 17 * 7) and spatial.dtype == np.float32
    assert taps["b1"].shape == (2, 192, 17, 17)
    logits = net_logits(net, torch.from_numpy(pool))
    assert logits.shape == (2, 1008)
    assert np.isfinite(pool).all() and pool.std() > 0


def test_inception_features_are_adm_tensors(inception_run):
    net, images, pool, spatial, taps = inception_run
    resized = tf1_resize_bilinear(torch.from_numpy(images).float().permute(0, 3, 1, 2), (299, 299))
    torch.testing.assert_close(taps["input"], (resized - 128) / 128, rtol=0, atol=0)
    # pool_3: global average of Mixed_7c.
    np.testing.assert_allclose(pool, taps["last"].mean(dim=(2, 3)).numpy(), rtol=1e-6, atol=1e-6)
    # mixed_6/conv[..., :7] in NHWC order, flattened as ADM's reshape does.
    nhwc = taps["b1"].permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(spatial, nhwc[..., :7].reshape(2, -1))
    assert (spatial >= 0).all()  # after the ReLU
    # IS logits: pool_3 @ W with W = fc.weight^T, no bias.
    logits = net_logits(net, torch.from_numpy(pool)).numpy()
    weight = net.network.fc.weight.detach().numpy()
    np.testing.assert_allclose(logits, pool @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_feature_net_specs(tmp_path):
    net = load_feature_net("evaluations.inception:random_inception_feature_net")
    assert net.name == "fid-inception-random-0" and not net.training

    class Scripted(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(1, 2)), images[:, :2, :2, :]

        @torch.jit.export
        def logits(self, pool):
            return pool * 2

    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Scripted()), str(path))
    scripted = load_feature_net(str(path))
    assert scripted.name.startswith("torchscript:")
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    pool, spatial = embed_batch(scripted, images, "cpu")
    np.testing.assert_allclose(pool, images.mean(axis=(1, 2)), rtol=1e-6)
    assert spatial.shape == (2, 12)
    assert torch.equal(net_logits(scripted, torch.ones(1, 3)), torch.full((1, 3), 2.0))

    class Exported(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(1, 2))

    batch = torch.export.Dim("batch")
    program = torch.export.export(
        Exported(), (torch.zeros(2, 3, 3, 3),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(tmp_path / "net.pt2"))
    exported = load_feature_net(str(tmp_path / "net.pt2"))
    pool, spatial = embed_batch(exported, images, "cpu")
    np.testing.assert_allclose(pool, images.mean(axis=(1, 2)), rtol=1e-6)
    assert spatial is None and net_logits(exported, torch.ones(1, 3)) is None

    with pytest.raises(ValueError, match="unknown feature network 'nonsense'"):
        load_feature_net("nonsense")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_feature_net(str(tmp_path / "junk.pt"))


def test_feature_nets_does_not_import_the_networks():
    # inception.py imports FeatureNet from feature_nets.py; the reverse goes through the
    # BUILTIN_NETS registry (resolved on use), so there is no import cycle.
    import ast
    import subprocess
    import sys

    from evaluations import feature_nets

    tree = ast.parse(open(feature_nets.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add((node.module or "") + ":" + ",".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not [name for name in imported if "inception" in name], imported
    code = (
        "import sys, evaluations.feature_nets as f; assert 'evaluations.inception' not in sys.modules; "
        "import evaluations.inception as i; assert i.FeatureNet is f.FeatureNet"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert feature_nets.BUILTIN_NETS["inception"] == "evaluations.inception:load_inception_feature_net"
