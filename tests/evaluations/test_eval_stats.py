"""
Which statistics FID and sFID are computed against: ADM's reference batches carry mu/sigma/mu_s/sigma_s of the
whole training set, which ADM's evaluator (and every published figure) uses; they belong to the FID Inception and
to no other feature network. Plus the checks that keep an evaluation from being lost or stale: output paths
checked first, few-sample covariance warnings, reference batches cached by content.
"""

import os

import numpy as np
import pytest

from evaluations import evaluator as evaluator_cli
from evaluations import make_reference_batch as make_ref_cli
from evaluations.evaluator import Evaluator
from evaluations.feature_nets import load_feature_net
from evaluations.frechet import compute_statistics
from evaluations.npz_io import NpzWriter

from conftest import images_around_one

# The Inception code path (evaluations.inception.InceptionFeatureNet: TF1 resize to 299, (x - 128) / 128,
# spatial features as the first 7 NHWC channels, IS logits through fc) around a tiny random-weight network, so
# covariances stay small: 8-d pool features and 4 x 2 x 2 = 16-d spatial ones.
TINY_INCEPTION = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from evaluations.feature_nets import FeatureNet
from evaluations.inception import InceptionFeatureNet


class TinyInceptionNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.pool_conv = nn.Conv2d(3, 8, 1)
            self.spatial_conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(8, 10)

    def forward(self, x):
        pool = torch.tanh(self.pool_conv(F.adaptive_avg_pool2d(x, 4)) * 3).mean(dim=(2, 3))
        spatial = F.relu(self.spatial_conv(F.adaptive_avg_pool2d(x, 2)) * 3)
        return pool, spatial


def build():
    return InceptionFeatureNet(TinyInceptionNetwork(), name="tiny-inception", fast=False)


class SameFeaturesOtherNet(FeatureNet):
    """The very same features under another network: no FID Inception, so ADM's statistics are not its."""

    name = "not-the-inception"

    def __init__(self):
        super().__init__()
        self.inner = build()

    def forward(self, images):
        return self.inner(images)

    def logits(self, pool):
        return self.inner.logits(pool)


def build_other():
    return SameFeaturesOtherNet()
'''


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny_inception.py"
    path.write_text(TINY_INCEPTION)
    return f"{path}:build"


def _images(n, size, seed):
    return images_around_one(n, size, seed, spread=70)


def _adm_like_reference(path, net, images):
    """
    A reference batch laid out as ADM's (arr_0 plus mu, sigma, mu_s, sigma_s, no network recorded) whose stored
    statistics are deliberately not those of its images. Returns (stored pool stats, stored spatial stats).
    """
    ev = Evaluator(net, progress=False)
    acts = ev.compute_activations([images])
    pool, spatial = compute_statistics(acts.pool), compute_statistics(acts.spatial)
    mu, sigma = pool.mu + 0.3, pool.sigma * 1.7 + np.eye(len(pool.mu)) * 0.05
    mu_s, sigma_s = spatial.mu * 0.5, spatial.sigma * 0.6 + np.eye(len(spatial.mu)) * 0.1
    np.savez(path, images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return (mu, sigma), (mu_s, sigma_s)


def _sample_stats(net, images):
    acts = Evaluator(net, progress=False).compute_activations([images])
    return compute_statistics(acts.pool), compute_statistics(acts.spatial)


def _fd(stats, mu_sigma):
    from evaluations.frechet import FIDStatistics

    return stats.frechet_distance(FIDStatistics(*mu_sigma))


def test_adm_reference_statistics_are_used_with_the_inception(tmp_path, spec, capsys):
    net = load_feature_net(spec)
    ref, sample = _images(24, 8, seed=1), _images(20, 8, seed=2)
    stored_pool, stored_spatial = _adm_like_reference(tmp_path / "ref.npz", net, ref)
    np.savez(tmp_path / "sample.npz", sample)
    sample_pool, sample_spatial = _sample_stats(net, sample)

    results = Evaluator(net, progress=False).evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False)
    # As ADM's evaluator: the Fréchet distance to the stored statistics, to float rounding.
    assert results["fid"] == pytest.approx(_fd(sample_pool, stored_pool), rel=1e-9)
    assert results["sfid"] == pytest.approx(_fd(sample_spatial, stored_spatial), rel=1e-9)
    # ... which is not what the reference images' own statistics give.
    own_pool, own_spatial = _sample_stats(net, ref)
    own = sample_pool.frechet_distance(own_pool)
    assert abs(results["fid"] - own) > 0.05 * own
    assert (results["ref_stats"], results["ref_stats_spatial"]) == ("stored", "stored")
    assert results["notes"] == []
    assert results["precision"] is not None  # precision and recall still use the reference images

    # The command line prints ADM's figure and names the statistics.
    capsys.readouterr()
    out_results = evaluator_cli.main(
        [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature_net", spec, "--no_cache",
         "--device", "cpu"]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"FID: {out_results['fid']}" and out_results["fid"] == pytest.approx(results["fid"], rel=1e-12)
    assert out[-1] == "Statistics: reference stored in the batch (mu, sigma, mu_s, sigma_s)"
    # The old switch still asks for the same thing.
    assert evaluator_cli.main(
        [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature_net", spec, "--no_cache",
         "--device", "cpu", "--use_stored_stats"]
    )["fid"] == pytest.approx(results["fid"], rel=1e-12)

    # The explicit other choice: recompute from the reference images.
    capsys.readouterr()
    recomputed = evaluator_cli.main(
        [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature_net", spec, "--no_cache",
         "--device", "cpu", "--ref_stats", "images"]
    )
    assert recomputed["fid"] == pytest.approx(own, rel=1e-9)
    assert recomputed["ref_stats"] == "images"
    assert capsys.readouterr().out.splitlines()[-1] == "Statistics: reference computed from its 24 images"


def test_unrecorded_statistics_are_not_used_with_another_network(tmp_path, spec, capsys):
    inception = load_feature_net(spec)
    other = load_feature_net(spec.replace(":build", ":build_other"))
    ref, sample = _images(24, 8, seed=3), _images(20, 8, seed=4)
    _adm_like_reference(tmp_path / "ref.npz", inception, ref)
    np.savez(tmp_path / "sample.npz", sample)
    results = Evaluator(other, progress=False).evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False)
    own_pool, own_spatial = _sample_stats(other, ref)
    sample_pool, sample_spatial = _sample_stats(other, sample)
    assert results["fid"] == pytest.approx(sample_pool.frechet_distance(own_pool), rel=1e-9)
    assert results["sfid"] == pytest.approx(sample_spatial.frechet_distance(own_spatial), rel=1e-9)
    assert results["ref_stats"] == "images"
    assert len(results["notes"]) == 1
    assert "record no feature network, so they are taken to be the FID Inception's" in results["notes"][0]
    assert "not 'not-the-inception''s; recomputed them from its 24 images" in results["notes"][0]


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        evaluator_cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("evaluator.py: error: "), err
    return err


def test_impossible_statistics_requests_are_one_line(tmp_path, spec, capsys, monkeypatch):
    net = load_feature_net(spec)
    ref, sample = _images(24, 8, seed=5), _images(20, 8, seed=6)
    np.savez(tmp_path / "plain.npz", ref)
    np.savez(tmp_path / "sample.npz", sample)
    _adm_like_reference(tmp_path / "ref.npz", net, ref)
    with np.load(tmp_path / "ref.npz") as obj:
        np.savez(tmp_path / "stats_only.npz", **{k: obj[k] for k in obj.files if k != "arr_0"})
        np.savez(tmp_path / "wide.npz", obj["arr_0"], mu=np.zeros(2048), sigma=np.eye(2048), mu_s=obj["mu_s"],
                 sigma_s=obj["sigma_s"])
    base = ["--feature_net", spec, "--no_cache", "--device", "cpu"]
    embedded = []
    monkeypatch.setattr(Evaluator, "compute_activations",
                        lambda self, *a, **k: embedded.append(1) or pytest.fail("embedded before the error"))

    err = _cli_error([str(tmp_path / "plain.npz"), str(tmp_path / "sample.npz"), "--ref_stats", "stored"] + base,
                     capsys)
    assert "plain.npz: --ref_stats stored, but it holds no statistics (mu, sigma)" in err
    # The older switch asks for the same, so it gets the same error rather than being ignored on such a batch.
    err = _cli_error([str(tmp_path / "plain.npz"), str(tmp_path / "sample.npz"), "--use_stored_stats"] + base, capsys)
    assert "plain.npz: --ref_stats stored, but it holds no statistics (mu, sigma)" in err
    err = _cli_error([str(tmp_path / "stats_only.npz"), str(tmp_path / "sample.npz"), "--ref_stats", "images"]
                     + base, capsys)
    assert "stats_only.npz: --ref_stats images, but it holds no 'arr_0' images to compute them from" in err
    err = _cli_error([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--ref_stats", "stored",
                      "--feature_net", spec.replace(":build", ":build_other"), "--no_cache", "--device", "cpu"],
                     capsys)
    assert "--ref_stats stored: " in err and "not 'not-the-inception''s; they are not used with it" in err
    with pytest.raises(SystemExit):
        evaluator_cli.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--ref_stats", "images",
                            "--use_stored_stats"] + base)
    capsys.readouterr()
    assert embedded == []

    # Stored statistics of the wrong size for the Inception's features: one line, after embedding.
    monkeypatch.undo()
    with pytest.raises(SystemExit) as info:
        evaluator_cli.main([str(tmp_path / "wide.npz"), str(tmp_path / "sample.npz")] + base)
    err = capsys.readouterr().err.splitlines()[-1]
    assert info.value.code == 2 and err.startswith("evaluator.py: error: ")
    assert "wide.npz: stored statistics 'mu', 'sigma' have shapes (2048,), (2048, 2048) but the feature network " \
           "gives 8-d features" in err and "--ref_stats images" in err


def test_statistics_only_reference_with_the_inception(tmp_path, spec):
    net = load_feature_net(spec)
    ref, sample = _images(24, 8, seed=7), _images(20, 8, seed=8)
    stored_pool, stored_spatial = _adm_like_reference(tmp_path / "ref.npz", net, ref)
    with np.load(tmp_path / "ref.npz") as obj:
        np.savez(tmp_path / "stats_only.npz", **{k: obj[k] for k in obj.files if k != "arr_0"})
    np.savez(tmp_path / "sample.npz", sample)
    results = Evaluator(net, progress=False).evaluate(tmp_path / "stats_only.npz", tmp_path / "sample.npz")
    sample_pool, sample_spatial = _sample_stats(net, sample)
    assert results["fid"] == pytest.approx(_fd(sample_pool, stored_pool), rel=1e-9)
    assert results["sfid"] == pytest.approx(_fd(sample_spatial, stored_spatial), rel=1e-9)
    assert results["precision"] is None and results["ref_stats"] == "stored"


def test_few_samples_warn_of_a_singular_covariance(tmp_path, spec):
    net = load_feature_net(spec)
    np.savez(tmp_path / "ref.npz", _images(24, 8, seed=9))
    np.savez(tmp_path / "sample.npz", _images(6, 8, seed=10))
    results = Evaluator(net, progress=False).evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False)
    warnings = [n for n in results["notes"] if n.startswith("warning:")]
    # 6 samples: 8-d pool (FID) and 16-d spatial (sFID) covariances are both singular; the 24 references' 16-d
    # spatial covariance is not.
    assert len(warnings) == 2
    assert "sample.npz (FID): 6 images for 8-d features, so the covariance is singular (rank at most 5 < 8)" \
        in warnings[0]
    assert "sample.npz (sFID): 6 images for 16-d features" in warnings[1]
    np.savez(tmp_path / "sample.npz", _images(17, 8, seed=10))
    results = Evaluator(net, progress=False).evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", use_cache=False)
    assert results["notes"] == []


def test_json_output_is_checked_before_any_work(tmp_path, spec, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", _images(24, 8, seed=11))
    np.savez(tmp_path / "sample.npz", _images(20, 8, seed=12))
    monkeypatch.setattr(Evaluator, "evaluate", lambda *a, **k: pytest.fail("evaluated before the --json check"))
    base = [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--feature_net", spec, "--no_cache",
            "--device", "cpu"]
    # /proc takes no new files, even from root.
    err = _cli_error(base + ["--json", "/proc/results.json"], capsys)
    assert "--json /proc/results.json: cannot write a file in /proc" in err
    (tmp_path / "taken").mkdir()
    err = _cli_error(base + ["--json", str(tmp_path / "taken")], capsys)
    assert f"{tmp_path}/taken is a folder; give the path of a file" in err
    (tmp_path / "file").write_text("x")
    err = _cli_error(base + ["--json", str(tmp_path / "file" / "out.json")], capsys)
    assert f"{tmp_path}/file is a file, not a folder" in err
    assert sorted(os.listdir(tmp_path)) == ["file", "ref.npz", "sample.npz", "taken", "tiny_inception.py"]


def test_make_reference_batch_checks_its_output_and_count_first(tmp_path, capsys):
    np.savez(tmp_path / "source.npz", _images(30, 8, seed=13))
    (tmp_path / "out").mkdir()
    for argv, message in [
        ([str(tmp_path / "out")], f"output {tmp_path}/out: {tmp_path}/out is a folder; give the path of a file"),
        ([str(tmp_path / "ref.npz"), "--num", "50"],
         "--num 50, but " + str(tmp_path / "source.npz") + " holds only 30 images; pass --num 30 or fewer"),
        (["/proc/ref.npz"], "output /proc/ref.npz: cannot write a file in /proc"),
    ]:
        with pytest.raises(SystemExit) as info:
            make_ref_cli.main([str(tmp_path / "source.npz")] + argv + ["--no_stats"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    # Nothing written, no temporary file left anywhere.
    assert sorted(os.listdir(tmp_path)) == ["out", "source.npz"] and os.listdir(tmp_path / "out") == []
    # --num equal to the count is fine.
    make_ref_cli.main([str(tmp_path / "source.npz"), str(tmp_path / "ref.npz"), "--num", "30", "--no_stats"])
    with np.load(tmp_path / "ref.npz") as obj:
        assert obj["arr_0"].shape == (30, 8, 8, 3)


def test_npz_writer_leaves_no_temporary_file_when_the_rename_fails(tmp_path):
    (tmp_path / "taken.npz").mkdir()
    with pytest.raises(OSError):
        with NpzWriter(tmp_path / "taken.npz") as writer:
            writer.write_array("arr_0", np.zeros((2, 4, 4, 3), np.uint8))
    assert os.listdir(tmp_path) == ["taken.npz"]


def test_reference_activations_are_cached_by_content(tmp_path, spec):
    net = load_feature_net(spec)
    cache = tmp_path / "cache"
    np.savez(tmp_path / "ref.npz", _images(24, 8, seed=14))
    first = Evaluator(net, batch_size=8, cache_dir=cache, progress=False)
    old = first.read_activations(tmp_path / "ref.npz", use_cache=True)
    assert first.embedded_batches == 3
    st = os.stat(tmp_path / "ref.npz")

    # Other images, same size, modification time set back: a stale cache would hand back the old activations.
    new_images = _images(24, 8, seed=15)
    np.savez(tmp_path / "ref.npz", new_images)
    os.utime(tmp_path / "ref.npz", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tmp_path / "ref.npz").st_size == st.st_size
    second = Evaluator(net, batch_size=8, cache_dir=cache, progress=False)
    acts = second.read_activations(tmp_path / "ref.npz", use_cache=True)
    assert second.embedded_batches == 3
    batches = [new_images[i : i + 8] for i in range(0, 24, 8)]
    np.testing.assert_array_equal(acts.pool, Evaluator(net, progress=False).compute_activations(batches).pool)
    assert np.abs(acts.pool - old.pool).max() > 0.01

    # The same bytes elsewhere are the same batch.
    os.link(tmp_path / "ref.npz", tmp_path / "copy.npz")
    third = Evaluator(net, batch_size=8, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(third.read_activations(tmp_path / "copy.npz", use_cache=True).pool, acts.pool)
    assert third.embedded_batches == 0


def test_unwritable_cache_is_a_note_not_a_lost_evaluation(tmp_path, spec):
    (tmp_path / "file").write_text("x")
    np.savez(tmp_path / "ref.npz", _images(24, 8, seed=16))
    np.savez(tmp_path / "sample.npz", _images(20, 8, seed=17))
    ev = Evaluator(load_feature_net(spec), cache_dir=tmp_path / "file" / "cache", progress=False)
    results = ev.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz")
    assert results["fid"] > 0
    assert [n for n in results["notes"] if "cannot write the activation cache" in n]
