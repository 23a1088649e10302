"""
Restoration metrics (evaluations/restoration.py): PSNR and SSIM against independent numpy implementations of
scikit-image's definitions, LPIPS against the formula on hand-made weights (torchvision / lpips key names), the
missing-weights message, and FID of reconstructions through the evaluator.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluations import restoration as R


def np_psnr(a, b, data_range):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(data_range**2 / mse)


def np_ssim_channel(a, b, data_range, win=7):
    # Every 7 x 7 window fully inside the image (skimage's crop), with the sample (N - 1) variances.
    a, b = a.astype(np.float64), b.astype(np.float64)
    wa = np.lib.stride_tricks.sliding_window_view(a, (win, win)).reshape(-1, win * win)
    wb = np.lib.stride_tricks.sliding_window_view(b, (win, win)).reshape(-1, win * win)
    ma, mb = wa.mean(1), wb.mean(1)
    va = wa.var(1, ddof=1)
    vb = wb.var(1, ddof=1)
    cov = ((wa - ma[:, None]) * (wb - mb[:, None])).sum(1) / (win * win - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return s.mean()


def pairs(seed=0, n=3, size=20):
    rng = np.random.RandomState(seed)
    truth = rng.randint(0, 256, (n, 3, size, size)).astype(np.uint8)
    noise = rng.randint(-40, 41, truth.shape)
    test = np.clip(truth.astype(int) + noise, 0, 255).astype(np.uint8)
    return truth, test


def test_psnr_matches_definition_in_every_range():
    truth, test = pairs()
    got = R.psnr(truth, test, 255)
    want = [np_psnr(t, s, 255) for t, s in zip(truth, test)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # The same images in [-1, 1] with data_range 2 give the same figures.
    np.testing.assert_allclose(R.psnr(truth / 127.5 - 1, test / 127.5 - 1, 2.0), want, rtol=1e-10)
    assert np.isinf(R.psnr(truth, truth, 255)).all()


def test_ssim_matches_definition():
    truth, test = pairs(1, 2, 23)
    got = R.ssim(truth, test, 255)
    want = [np.mean([np_ssim_channel(t[c], s[c], 255) for c in range(3)]) for t, s in zip(truth, test)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(R.ssim(truth, truth, 255), 1.0, rtol=1e-12)
    # A rescaling with the data range leaves SSIM unchanged; an offset does not ([-1, 1] images differ).
    np.testing.assert_allclose(R.ssim(truth / 255.0, test / 255.0, 1.0), want, rtol=1e-9)
    assert np.abs(R.ssim(truth / 127.5 - 1, test / 127.5 - 1, 2.0) - want).max() > 1e-3


def test_ssim_against_skimage_when_present():
    metrics = pytest.importorskip("skimage.metrics")
    truth, test = pairs(2, 1, 32)
    want = metrics.structural_similarity(truth[0], test[0], data_range=255, channel_axis=0)
    np.testing.assert_allclose(R.ssim(truth, test, 255), [want], rtol=1e-10)
    want = metrics.peak_signal_noise_ratio(truth[0], test[0], data_range=255)
    np.testing.assert_allclose(R.psnr(truth, test, 255), [want], rtol=1e-12)


def test_metric_input_errors():
    truth, test = pairs()
    with pytest.raises(ValueError, match="must have the same shape"):
        R.psnr(truth, test[:, :, :10], 255)
    with pytest.raises(ValueError, match="data_range must be a positive number"):
        R.ssim(truth, test, 0)
    with pytest.raises(ValueError, match="at least 7 x 7"):
        R.ssim(truth[:, :, :5, :5], test[:, :, :5, :5], 255)


# --- LPIPS ----------------------------------------------------------------------------------------------------------

VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def fake_weights(tmp_path, net):
    """
    Random weights saved under torchvision's and lpips's key names (plus classifier keys LPIPS must ignore).
    """
    gen = torch.Generator().manual_seed(0)
    backbone = {}
    if net == "vgg":
        cin = 3
        for idx, cout in zip(VGG_CONVS, VGG_WIDTHS):
            backbone[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (2 / (9 * cin)) ** 0.5
            backbone[f"features.{idx}.bias"] = torch.randn(cout, generator=gen) * 0.01
            cin = cout
        channels = [64, 128, 256, 512, 512]
    else:
        for idx, (cout, cin, k) in zip([0, 3, 6, 8, 10], [(64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3), (256, 256, 3)]):
            backbone[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2 / (k * k * cin)) ** 0.5
            backbone[f"features.{idx}.bias"] = torch.randn(cout, generator=gen) * 0.01
        channels = [64, 192, 384, 256, 256]
    backbone["classifier.0.weight"] = torch.zeros(2, 2)
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(channels)}
    torch.save(backbone, tmp_path / "backbone.pth")
    torch.save(lins, tmp_path / "lins.pth")
    return backbone, lins


def lpips_by_hand(backbone, lins, a, b, net):
    # LPIPS v0.1 written out: scaling layer, the trunk's five ReLU outputs, channel-normalised squared
    # differences, the linear weights, a spatial mean, a sum over the five.
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        x = (x - shift) / scale
        out = []
        if net == "vgg":
            pools_after = {2, 4, 7, 10}
            for n, idx in enumerate(VGG_CONVS):
                x = F.relu(F.conv2d(x, backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"], padding=1))
                if n + 1 in (2, 4, 7, 10, 13):
                    out.append(x)
                if n + 1 in pools_after:
                    x = F.max_pool2d(x, 2)
        else:
            conf = [(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]
            for n, (idx, stride, pad) in enumerate(conf):
                x = F.relu(F.conv2d(x, backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"], stride, pad))
                out.append(x)
                if n < 2:
                    x = F.max_pool2d(x, 3, 2)
        return out

    total = 0
    for k, (x, y) in enumerate(zip(taps(a), taps(b))):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((x - y) ** 2 * lins[f"lin{k}.model.1.weight"]).sum(1).mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_formula(tmp_path, net):
    backbone, lins = fake_weights(tmp_path, net)
    model = R.load_lpips(str(tmp_path / "backbone.pth"), str(tmp_path / "lins.pth"), net=net)
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    got = R.lpips_distance(model, a, b)
    want = lpips_by_hand(backbone, lins, a, b, net).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert (got > 0).all()
    np.testing.assert_allclose(R.lpips_distance(model, a, a), 0.0, atol=1e-12)


def test_lpips_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg backbone .* does not exist. Nothing is downloaded"):
        R.load_lpips(str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "vgg.pth"))
    fake_weights(tmp_path, "alex")
    with pytest.raises(ValueError, match="is not torchvision's vgg state dict: it lacks features.0.weight"):
        R.load_lpips(str(tmp_path / "lins.pth"), str(tmp_path / "lins.pth"), net="vgg")
    with pytest.raises(ValueError, match="is not LPIPS v0.1's alex.pth: 'lin0.model.1.weight'"):
        R.load_lpips(str(tmp_path / "backbone.pth"), str(tmp_path / "backbone.pth"), net="alex")
    with pytest.raises(ValueError, match="unknown LPIPS backbone 'squeeze'"):
        R.LPIPS("squeeze")


# --- the whole set --------------------------------------------------------------------------------------------------


def test_restoration_metrics_with_fid(tmp_path):
    class MeanColour(torch.nn.Module):
        # A stand-in feature network with the evaluator's interface: NCHW floats in [0, 255] -> features.
        name = "mean_colour"
        channels = 3

        def forward(self, images):
            pooled = F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2), 2).flatten(1)
            return pooled, None

    rng = np.random.RandomState(0)
    truth = rng.randint(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    recon = np.clip(truth.astype(int) + rng.randint(-20, 21, truth.shape), 0, 255).astype(np.uint8)
    out = R.restoration_metrics(truth, recon)
    nchw = lambda x: x.transpose(0, 3, 1, 2)
    assert out["psnr"] == pytest.approx(np.mean([np_psnr(t, r, 255) for t, r in zip(truth, recon)]))
    assert out["ssim"] == pytest.approx(
        np.mean([np.mean([np_ssim_channel(t[c], r[c], 255) for c in range(3)]) for t, r in zip(nchw(truth), nchw(recon))])
    )
    assert out["lpips"] is None and out["num_images"] == 12
    fid = R.distribution_metrics(truth, recon, MeanColour())
    same = R.distribution_metrics(truth, truth, MeanColour())
    # A set against itself is 0 up to the matrix square root's rounding: 12 images give a singular 12x12
    # covariance (trace about 1e3), and the rounding (seen up to 4e-6) depends on the BLAS thread count.
    assert fid["fid"] > 1.0 and abs(same["fid"]) < 1e-4
    # KID grows with the distance between the sets: inverted images are much further than noisy ones.
    far = R.distribution_metrics(truth, 255 - truth, MeanColour())
    assert far["kid_mean"] > fid["kid_mean"] and np.isfinite(fid["kid_std"])


def test_restoration_fid_from_few_images_warns(capsys):
    class Flat(torch.nn.Module):
        name = "flat"

        def forward(self, images):
            return images.flatten(1)[:, :64], None

    rng = np.random.RandomState(1)
    truth = rng.randint(0, 256, (8, 8, 8, 3)).astype(np.uint8)
    out = R.distribution_metrics(truth, truth[::-1].copy(), Flat())
    err = capsys.readouterr().err.splitlines()
    assert len(out["notes"]) == 2 and err == out["notes"]
    assert out["notes"][0].startswith("warning: ground truth (FID): 8 images for 64-d features, so the covariance is "
                                      "singular (rank at most 7 < 64)")
