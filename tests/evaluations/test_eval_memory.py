"""
What the evaluator keeps per sample (the features it needs, not the feature maps they were cut from) and a damaged
batch file as one line naming it, before the sample batch is embedded.
"""

import numpy as np
import pytest
import torch

from conftest import load_script

from evaluations.digits_net import DigitsNet
from evaluations.evaluator import Evaluator
from evaluations.feature_nets import embed_batch
from evaluations.npz_io import BatchFormatError


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def retained_bytes(array):
    """
    The bytes kept alive by a numpy array: those of the buffer at the end of its chain of bases (a tensor's whole
    storage when it came from torch).
    """
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if torch.is_tensor(base):
        return base.untyped_storage().nbytes()
    if isinstance(base, np.ndarray):
        return base.nbytes
    return memoryview(base).nbytes


class SlicedNet(torch.nn.Module):
    """Spatial features that are a slice of a larger map (as many feature networks cut them)."""

    name = "sliced"

    def forward(self, images):
        fmap = images.permute(0, 3, 1, 2).repeat(1, 8, 1, 1).contiguous()  # N x 24 x H x W
        return fmap.mean(dim=(2, 3)), fmap[:, :2].flatten(1)


@pytest.mark.parametrize("net", [DigitsNet(), SlicedNet()], ids=["digits", "sliced"])
def test_stored_features_keep_no_feature_map_alive(net):
    torch.manual_seed(0)
    with torch.no_grad():
        pool, spatial = embed_batch(net.eval(), _images(5), "cpu")
    for features in (pool, spatial):
        assert retained_bytes(features) == features.nbytes
    if isinstance(net, DigitsNet):
        assert spatial.shape == (5, 4 * 8 * 8)  # 1 KiB of the conv3 map's 16 KiB per image


def _flip(path, where):
    data = bytearray(path.read_bytes())
    data[where(data)] ^= 0x08
    path.write_bytes(bytes(data))


def _in_the_images(data):
    return len(data) // 2


def _in_a_member_name(data):
    return data.rindex(b"arr_0.npy") + 1  # the name in the zip's central directory


@pytest.mark.parametrize("where", [_in_the_images, _in_a_member_name])
def test_a_damaged_reference_is_one_line_before_the_samples_are_embedded(tmp_path, capsys, where):
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, _images(40, seed=1))
    np.savez(sample, _images(40, seed=2))
    _flip(ref, where)
    evaluator = Evaluator(DigitsNet().eval(), batch_size=10, progress=False)
    with pytest.raises(BatchFormatError) as info:
        evaluator.evaluate(str(ref), str(sample), use_cache=False)
    assert str(info.value).startswith(f"{ref}: ") and "damaged" in str(info.value)
    assert evaluator.embedded_batches <= 4  # the reference's at most, none of the samples'


def test_damaged_stored_statistics_are_one_line(tmp_path, capsys):
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, mu=rng.normal(size=128), sigma=np.eye(128))
    np.savez(sample, _images(8))
    data = bytearray(ref.read_bytes())
    data[data.index(b"sigma.npy") + 2000] ^= 0x01  # inside sigma's values
    ref.write_bytes(bytes(data))
    evaluator = load_script("evaluations/evaluator.py")
    with pytest.raises(SystemExit) as stopped:
        evaluator.main([str(ref), str(sample), "--no_cache", "--feature_net", "tests/evaluations/test_eval_memory.py:_digits"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"evaluator.py: error: {ref}: 'sigma' is damaged (Bad CRC-32 for file 'sigma.npy')" in err
    assert "Traceback" not in err


def _digits(device="cpu"):
    torch.manual_seed(0)
    return DigitsNet().to(device).eval()


def test_a_damaged_fortran_ordered_batch_is_one_line(tmp_path):
    # Fortran-ordered arrays are loaded whole instead of streamed: the damage shows in np.load.
    path = tmp_path / "f.npz"
    np.savez(path, np.asfortranarray(_images(6)))
    _flip(path, _in_the_images)
    from evaluations.npz_io import NpzImageReader

    with pytest.raises(BatchFormatError, match=r"f.npz: 'arr_0' is damaged \(Bad CRC-32"):
        NpzImageReader(path)


def test_activations_filled_in_place_equal_the_joined_batches(tmp_path):
    path = tmp_path / "batch.npz"
    images = _images(23)
    np.savez(path, images)
    torch.manual_seed(0)
    evaluator = Evaluator(DigitsNet().eval(), batch_size=5, progress=False)
    with torch.no_grad():
        acts = evaluator.read_activations(str(path))
        joined = evaluator.compute_activations([images[i : i + 5] for i in range(0, 23, 5)])
    np.testing.assert_array_equal(acts.pool, joined.pool)
    np.testing.assert_array_equal(acts.spatial, joined.spatial)
    assert acts.pool.shape == (23, 128) and acts.spatial.shape == (23, 256)
