"""
evaluations/evaluator.py and evaluations/make_reference_batch.py end to end, with a tiny
feature network loaded from a Python file (the --feature_net plug-in path).
"""

import json
import re

import numpy as np
import pytest
import torch

from evaluations import evaluator as evaluator_cli
from evaluations import make_reference_batch as make_ref_cli
from evaluations.evaluator import Evaluator
from evaluations.feature_nets import load_feature_net, net_identity, net_name
from evaluations.frechet import frechet_distance
from evaluations.inception_score import inception_score
from evaluations.kid import kernel_inception_distance
from evaluations.precision_recall import compute_prec_recall

from conftest import images_around_one

TINY_NET = '''
import torch
import torch.nn.functional as F
from evaluations.feature_nets import FeatureNet


class TinyNet(FeatureNet):
    name = "tiny-test-net"

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 12, generator=g))
        self.register_buffer("head", torch.randn(12, 6, generator=g))

    def forward(self, images):
        x = F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2), 4).flatten(1) / 255
        return torch.tanh(x @ self.proj * 3), x[:, :5]

    def logits(self, pool):
        return pool @ self.head * 4


def build():
    return TinyNet()


def build_retrained():
    # Same name and feature dimension, other weights: only the weights digest tells them apart.
    return TinyNet(seed=1)
'''


@pytest.fixture
def tiny_spec(tmp_path):
    path = tmp_path / "tiny_net.py"
    path.write_text(TINY_NET)
    return f"{path}:build"


def _images(n, size, seed):
    return images_around_one(n, size, seed, spread=60)


def _direct_results(net, ref, sample):
    """The metrics from features of whole arrays, bypassing the evaluator's batching."""
    with torch.no_grad():
        ref_pool, ref_sp = (t.numpy() for t in net(torch.from_numpy(ref).float()))
        pool, sp = (t.numpy() for t in net(torch.from_numpy(sample).float()))
        logits = net.logits(torch.from_numpy(pool)).numpy()
    fd = lambda a, b: frechet_distance(
        np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False)
    )
    precision, recall = compute_prec_recall(ref_pool, pool, progress=False)
    kid_mean, kid_std = kernel_inception_distance(ref_pool, pool)
    return {
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "inception_score": inception_score(logits),
        "fid": fd(pool, ref_pool),
        "sfid": fd(sp, ref_sp),
        "precision": precision,
        "recall": recall,
    }


def test_evaluator_cli_prints_adm_lines_and_writes_json(tmp_path, tiny_spec, capsys):
    ref, sample = _images(40, 12, seed=1), _images(27, 16, seed=2)
    np.savez(tmp_path / "ref.npz", ref)
    np.savez_compressed(tmp_path / "sample.npz", sample)
    argv = [
        str(tmp_path / "ref.npz"),
        str(tmp_path / "sample.npz"),
        "--feature_net", tiny_spec,
        "--batch_size", "7",
        "--device", "cpu",
        "--cache_dir", str(tmp_path / "cache"),
        "--json", str(tmp_path / "out" / "results.json"),
    ]
    evaluator_cli.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    labels = [line.split(": ")[0] for line in lines]
    assert labels == ["Inception Score", "FID", "sFID", "Precision", "Recall", "KID", "Statistics"]
    assert lines[6] == "Statistics: reference computed from its 40 images"

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    expected = _direct_results(load_feature_net(tiny_spec), ref, sample)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert lines[1] == f"FID: {results['fid']}"
    assert lines[5] == f"KID: {results['kid_mean']} ± {results['kid_std']}"
    assert (results["num_ref"], results["num_samples"]) == (40, 27)
    assert results["feature_net"] == "tiny-test-net"
    assert (results["ref_stats"], results["ref_stats_spatial"]) == ("images", "images")
    assert results["fid"] > 0.01 and 0 < results["precision"] <= 1


def _fid_against(net, sample, mu, sigma):
    pool = net(torch.from_numpy(sample).float())[0].numpy()
    return frechet_distance(np.mean(pool, 0), np.cov(pool, rowvar=False), mu, sigma)


def test_reference_statistics_of_the_same_network_are_used(tmp_path, tiny_spec):
    ref, sample = _images(20, 8, seed=3), _images(20, 8, seed=4)
    net = load_feature_net(tiny_spec)
    name, weights = net_identity(net)
    mu, sigma = np.full(12, 0.5), np.eye(12) * 0.1
    np.savez(tmp_path / "ref.npz", ref, mu=mu, sigma=sigma, stats_feature_net=name,
             stats_feature_weights=weights)
    np.savez(tmp_path / "sample.npz", sample)
    results = Evaluator(net, progress=False).evaluate(
        tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False
    )
    assert results["fid"] == pytest.approx(_fid_against(net, sample, mu, sigma), rel=1e-6)
    assert (results["ref_stats"], results["ref_stats_spatial"]) == ("stored", "images")
    assert len(results["notes"]) == 1
    assert results["notes"][0].endswith("ref.npz stores mu and sigma but no mu_s, sigma_s: sFID uses statistics of its 20 images")

    np.savez(tmp_path / "ref.npz", ref, mu=np.zeros(5), sigma=np.eye(5), stats_feature_net=name,
             stats_feature_weights=weights)
    with pytest.raises(ValueError, match="stored statistics 'mu', 'sigma' have shapes \\(5,\\), \\(5, 5\\) but the "
                       "feature network gives 12-d features"):
        Evaluator(net, progress=False).evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz")


def test_reference_statistics_without_identity_are_recomputed(tmp_path, tiny_spec, capsys):
    ref, sample = _images(20, 8, seed=3), _images(20, 8, seed=4)
    mu, sigma = np.full(12, 0.5), np.eye(12) * 0.1  # not the statistics of ref's images
    np.savez(tmp_path / "ref.npz", ref, mu=mu, sigma=sigma)
    np.savez(tmp_path / "sample.npz", sample)
    net = load_feature_net(tiny_spec)
    results = Evaluator(net, progress=False).evaluate(
        tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False
    )
    ref_pool = net(torch.from_numpy(ref).float())[0].numpy()
    expected = _fid_against(net, sample, ref_pool.mean(0), np.cov(ref_pool, rowvar=False))
    assert results["fid"] == pytest.approx(expected, rel=1e-6)
    err = capsys.readouterr().err
    assert "record no feature network, so they are taken to be the FID Inception's" in err
    assert "not 'tiny-test-net''s; recomputed them from its 20 images" in err
    assert len(results["notes"]) == 1 and results["ref_stats"] == "images"

    # Insisting on them is one clear error, before any image is embedded.
    insisting = Evaluator(net, progress=False, ref_stats="stored")
    with pytest.raises(ValueError, match="--ref_stats stored: .*ref.npz: its statistics .* record no feature "
                       "network, so they are taken to be the FID Inception's .*; they are not used with it"):
        insisting.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False)
    assert insisting.embedded_batches == 0


def test_statistics_of_another_network_of_the_same_dimension_are_not_used(tmp_path, tiny_spec, capsys):
    ref, sample = _images(20, 8, seed=3), _images(20, 8, seed=4)
    np.savez(tmp_path / "source.npz", ref)
    np.savez(tmp_path / "sample.npz", sample)
    make_ref_cli.main([str(tmp_path / "source.npz"), str(tmp_path / "ref.npz"),
                       "--feature_net", tiny_spec, "--device", "cpu"])
    other = load_feature_net(tiny_spec.replace(":build", ":build_retrained"))
    assert net_name(other) == "tiny-test-net"
    results = Evaluator(other, progress=False).evaluate(
        tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False
    )
    ref_pool = other(torch.from_numpy(ref).float())[0].numpy()
    expected = _fid_against(other, sample, ref_pool.mean(0), np.cov(ref_pool, rowvar=False))
    assert results["fid"] == pytest.approx(expected, rel=1e-6)
    _, own_weights = net_identity(load_feature_net(tiny_spec))
    _, other_weights = net_identity(other)
    assert own_weights != other_weights
    err = capsys.readouterr().err
    assert f"computed with feature network 'tiny-test-net' (weights {own_weights}), not 'tiny-test-net' (weights {other_weights}); recomputed" in err
    with pytest.raises(ValueError, match="--ref_stats stored: .* computed with feature network 'tiny-test-net'"):
        Evaluator(other, progress=False, ref_stats="stored").evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz")

    # Statistics only (no images to recompute from): refused in one line, exit status 2.
    with np.load(tmp_path / "ref.npz") as obj:
        np.savez(tmp_path / "stats_only.npz", **{k: obj[k] for k in obj.files if k != "arr_0"})
    argv = [str(tmp_path / "stats_only.npz"), str(tmp_path / "sample.npz"), "--no_cache", "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        evaluator_cli.main(argv + ["--feature_net", tiny_spec.replace(":build", ":build_retrained")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no 'arr_0' images to compute them from" in err
    # With the network they came from, FID and sFID come from them; precision/recall are n/a.
    results = evaluator_cli.main(argv + ["--feature_net", tiny_spec])
    direct = _direct_results(load_feature_net(tiny_spec), ref, sample)
    assert results["fid"] == pytest.approx(direct["fid"], rel=1e-5)
    assert results["sfid"] == pytest.approx(direct["sfid"], rel=1e-5)
    assert results["precision"] is None and results["kid_mean"] is None
    out = capsys.readouterr().out
    assert "Precision: n/a" in out and "KID: n/a" in out


def test_reference_of_another_image_size_gives_a_warning(tmp_path, tiny_spec, capsys):
    np.savez(tmp_path / "ref.npz", _images(16, 32, seed=3))
    np.savez(tmp_path / "sample.npz", _images(16, 16, seed=4))
    results = Evaluator(load_feature_net(tiny_spec), progress=False).evaluate(
        tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False
    )
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning:")]
    assert len(warnings) == 1 and "reference images are 32x32 but samples are 16x16" in warnings[0]
    assert results["notes"] == warnings

    np.savez(tmp_path / "ref.npz", _images(16, 16, seed=3))
    Evaluator(load_feature_net(tiny_spec), progress=False).evaluate(
        tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False
    )
    assert "warning" not in capsys.readouterr().err


def test_reference_activations_are_cached(tmp_path, tiny_spec):
    np.savez(tmp_path / "ref.npz", _images(10, 8, seed=5))
    net = load_feature_net(tiny_spec)
    first = Evaluator(net, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    acts = first.read_activations(tmp_path / "ref.npz", use_cache=True)
    assert first.embedded_batches == 3

    second = Evaluator(net, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    cached = second.read_activations(tmp_path / "ref.npz", use_cache=True)
    assert second.embedded_batches == 0
    np.testing.assert_array_equal(cached.pool, acts.pool)
    np.testing.assert_array_equal(cached.spatial, acts.spatial)

    # A network of the same name with other weights does not reuse them.
    other = load_feature_net(tiny_spec.replace(":build", ":build_retrained"))
    retrained = Evaluator(other, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    retrained.read_activations(tmp_path / "ref.npz", use_cache=True)
    assert retrained.embedded_batches == 3

    # A rewritten batch file is embedded again.
    np.savez(tmp_path / "ref.npz", _images(12, 8, seed=6))
    third = Evaluator(net, batch_size=4, cache_dir=tmp_path / "cache", progress=False)
    assert len(third.read_activations(tmp_path / "ref.npz", use_cache=True)) == 12
    assert third.embedded_batches == 3


def test_evaluator_cli_reports_bad_batches(tmp_path, tiny_spec, capsys):
    np.savez(tmp_path / "ref.npz", _images(10, 8, seed=7))
    np.savez(tmp_path / "sample.npz", images=_images(10, 8, seed=8))
    argv = [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature_net", tiny_spec]
    with pytest.raises(SystemExit) as info:
        evaluator_cli.main(argv + ["--no_cache"])
    assert info.value.code == 2
    assert re.fullmatch(r".*: error: .*sample.npz: no 'arr_0' array in the npz \(found: images\)\n",
                        capsys.readouterr().err)


def test_make_reference_batch_from_a_folder(tmp_path, tiny_spec):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(9)
    sizes = [(40, 64), (16, 16), (50, 20), (33, 35)]  # (h, w)
    for i, (h, w) in enumerate(sizes):
        target = folder / ("nested" if i == 2 else "") / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(target)
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, size=(20, 20), dtype=np.uint8)).save(folder / "gray.jpg")

    out = tmp_path / "ref.npz"
    make_ref_cli.main([str(folder), str(out), "--image_size", "16", "--feature_net", tiny_spec,
                       "--batch_size", "2", "--device", "cpu"])
    with np.load(out) as obj:
        arr = obj["arr_0"]
        assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
        # Sorted, recursive: gray.jpg, img0, img1, img3, nested/img2.
        # img0 is 64x40 (w x h): box-halved once to 32x20, bicubic to 26x16, crop x 5..20.
        with Image.open(folder / "img0.png") as img:
            halved = img.convert("RGB").resize((32, 20), resample=Image.BOX)
            expected = np.array(halved.resize((26, 16), resample=Image.BICUBIC))[:, 5:21]
        np.testing.assert_array_equal(arr[1], expected)
        with Image.open(folder / "img1.png") as img:  # already 16x16
            np.testing.assert_array_equal(arr[2], np.array(img.convert("RGB")))
        assert (arr[0] == arr[0][..., :1]).all()  # the grayscale image, as RGB

        net = load_feature_net(tiny_spec)
        pool, spatial = (t.numpy() for t in net(torch.from_numpy(arr).float()))
        np.testing.assert_allclose(obj["mu"], pool.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(obj["sigma"], np.cov(pool, rowvar=False), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(obj["sigma_s"], np.cov(spatial, rowvar=False), rtol=1e-4, atol=1e-7)
        assert str(obj["stats_feature_net"]) == "tiny-test-net"

    with pytest.raises(SystemExit):
        make_ref_cli.main([str(folder), str(tmp_path / "x.npz"), "--no_stats"])  # no --image_size


def test_make_reference_batch_from_an_npz_subset(tmp_path, tiny_spec):
    source = _images(30, 10, seed=10)
    np.savez(tmp_path / "source.npz", source)
    out = tmp_path / "ref.npz"
    make_ref_cli.main([str(tmp_path / "source.npz"), str(out), "--num", "12", "--seed", "3",
                       "--no_stats"])
    picked = np.sort(np.random.default_rng(3).choice(30, size=12, replace=False))
    with np.load(out) as obj:
        assert obj.files == ["arr_0"]
        np.testing.assert_array_equal(obj["arr_0"], source[picked])

    # Evaluating a batch against itself: FID 0, precision and recall 1.
    make_ref_cli.main([str(tmp_path / "source.npz"), str(out), "--feature_net", tiny_spec])
    net = load_feature_net(tiny_spec)
    results = Evaluator(net, progress=False).evaluate(out, tmp_path / "source.npz", use_cache=False)
    assert results["fid"] == pytest.approx(0, abs=1e-6)
    assert results["sfid"] == pytest.approx(0, abs=1e-6)
    assert (results["precision"], results["recall"]) == (1.0, 1.0)


def _cli_error(argv, capsys):
    """Run the evaluator CLI expecting a usage error: (exit status, stderr)."""
    with pytest.raises(SystemExit) as info:
        evaluator_cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--device", "gpu0"], "--device 'gpu0' is not a torch device; pass cpu, cuda or cuda:N"),
        (["--feature_net", "nonsense"], "unknown feature network 'nonsense'"),
        (["--fast_gpu", "--device", "cpu"], "--fast_gpu speeds up CUDA only; drop it for --device cpu"),
        (["--feature_net", "no_such_module_xyz:build"], "--feature_net 'no_such_module_xyz:build' cannot be loaded"),
    ],
)
def test_cli_usage_errors_are_one_line(tmp_path, capsys, flags, message):
    np.savez(tmp_path / "ref.npz", _images(6, 8, seed=1))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=2))
    code, err = _cli_error([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--no_cache"] + flags, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("evaluator.py: error: ")
    assert message in err


def test_cli_refuses_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    np.savez(tmp_path / "ref.npz", _images(6, 8, seed=1))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=2))
    for cli in (evaluator_cli, make_ref_cli):
        args = ["--device", "cuda"] + (["--no_cache"] if cli is evaluator_cli else [])
        with pytest.raises(SystemExit) as info:
            cli.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")] + args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1
        assert "--device cuda: CUDA is not available here" in err and "pass --device cpu" in err


def test_cli_float_samples_are_refused_with_the_conversion(tmp_path, capsys, tiny_spec):
    # Floats in [0, 1] read as uint8 levels are near-black images: an FID of about 1263 and exit status 0.
    np.savez(tmp_path / "ref.npz", _images(6, 8, seed=1))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=2) / np.float32(255))
    code, err = _cli_error([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--no_cache",
                            "--feature_net", tiny_spec], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "sample.npz: 'arr_0' has dtype float32" in err
    assert "(x * 255).round().clip(0, 255).astype(np.uint8)" in err


def test_cli_wrong_or_corrupt_inception_weights_are_one_line(tmp_path, capsys):
    from evaluations.inception import FIDInceptionV3

    np.savez(tmp_path / "ref.npz", _images(6, 8, seed=1))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=2))
    argv = [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--no_cache", "--device", "cpu"]
    # Something like torchvision's Inception-v3: an aux head and a 1000-way fc.
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if "Mixed_7c" not in k}
    state.update({"AuxLogits.fc.weight": torch.zeros(1000, 768), "fc.weight": torch.zeros(1000, 2048)})
    torch.save(state, tmp_path / "wrong.pth")
    code, err = _cli_error(argv + ["--inception_path", str(tmp_path / "wrong.pth")], capsys)
    assert code == 2 and err.count("\n") == 1 and len(err) < 800
    assert f"{tmp_path}/wrong.pth: not the pt_inception-2015-12-05-6726825d.pth weights" in err
    # Mixed_7c has 9 convs x 5 tensors; plus 1 unexpected key and 1 of another shape.
    assert "47 keys do not match the 472 expected: 45 missing (" in err
    assert "1 unexpected (AuxLogits.fc.weight); 1 of another shape (fc.weight)" in err

    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage" * 100)
    code, err = _cli_error(argv + ["--inception_path", str(tmp_path / "corrupt.pth")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path}/corrupt.pth: not the pt_inception-2015-12-05-6726825d.pth weights" in err
    assert "torch.load cannot read it" in err


def test_cli_errors_have_no_traceback(tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "ref.npz", _images(6, 8, seed=1))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=2))
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    proc = subprocess.run(
        [sys.executable, evaluator_cli.__file__, str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"),
         "--no_cache", "--device", "cpu", "--inception_path", str(tmp_path / "corrupt.pth")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "corrupt.pth: not the pt_inception-2015-12-05-6726825d.pth weights" in proc.stderr
