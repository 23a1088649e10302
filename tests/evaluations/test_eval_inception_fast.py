"""
The fast Inception arrangement (evaluations/inception_fast.py) against the reference network
(fast=False) on random weights: pool_3, mixed_6/conv and logits within 1e-4 relative.
"""

import inspect

import numpy as np
import pytest
import torch

from evaluations import inception_fast
from evaluations.feature_nets import embed_batch, net_identity, net_logits
from evaluations.inception import (
    FIDInceptionV3,
    InceptionFeatureNet,
    random_inception_feature_net,
    tf1_resize_bilinear,
)
from evaluations.inception_fast import MatmulResize, resize_matrix


def _network_with_random_batchnorm(seed=0):
    """Random convolutions and BatchNorm statistics, so folding them is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
        elif isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = 0.5 + torch.rand(c, generator=gen)
            module.bias.data = torch.randn(c, generator=gen) * 0.2
            module.running_mean.data = torch.randn(c, generator=gen) * 0.2
            module.running_var.data = 0.5 + torch.rand(c, generator=gen)
    network.fc.weight.data = torch.randn(network.fc.weight.shape, generator=gen) * 0.05
    return network.eval()


def _assert_close(got, expected, what):
    scale = np.abs(expected).max()
    assert scale > 0, what
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


@pytest.fixture(scope="module")
def network():
    return _network_with_random_batchnorm()


@pytest.fixture(scope="module")
def nets(network):
    reference = InceptionFeatureNet(network, name="random-bn", fast=False)
    fast = InceptionFeatureNet(network, name="random-bn", fast=True)
    return reference, fast


def _features(net, images):
    pool, spatial = embed_batch(net, images, "cpu")
    logits = net_logits(net, torch.from_numpy(pool)).numpy()
    return pool, spatial, logits


def test_fast_features_equal_the_reference(nets):
    reference, fast = nets
    n, h, w = 2, 21, 26
    images = np.random.default_rng(h).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    expected = _features(reference, images)
    got = _features(fast, images)
    for what, a, b in zip(("pool_3", "mixed_6/conv", "logits"), got, expected):
        assert a.shape == b.shape and a.dtype == np.float32
        _assert_close(a, b, what)
    assert expected[1].shape == (n, 17 * 17 * 7)


def test_fast_features_without_the_fused_cpu_convolution(nets, monkeypatch):
    # The path CUDA (and a torch without oneDNN's fused op) takes: conv2d, then relu_.
    monkeypatch.setattr(inception_fast, "FUSED_CPU_CONV", False)
    reference, fast = nets
    images = np.random.default_rng(5).integers(0, 256, size=(1, 30, 30, 3), dtype=np.uint8)
    for what, a, b in zip(("pool_3", "mixed_6/conv", "logits"), _features(fast, images), _features(reference, images)):
        _assert_close(a, b, what)


def test_fast_and_reference_nets_share_identity_and_fast_gpu_is_cpu_no_op(network, nets):
    # Caches and reference statistics are shared between the two paths: same name and weights.
    reference, fast = nets
    assert fast.fast and not reference.fast
    assert net_identity(fast) == net_identity(reference)
    assert inspect.signature(random_inception_feature_net).parameters["fast"].default is True
    fast_gpu = InceptionFeatureNet(network, name="random-bn", fast_gpu=True)
    # Its figures differ on a GPU, so it never shares caches or statistics with float32 runs.
    assert fast_gpu.name == "random-bn+fast_gpu"
    images = np.random.default_rng(6).integers(0, 256, size=(1, 16, 16, 3), dtype=np.uint8)
    for a, b in zip(embed_batch(fast_gpu, images, "cpu"), embed_batch(fast, images, "cpu")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("in_hw", [(5, 7), (40, 33), (16, 20), (299, 299), (512, 384)])
def test_matmul_resize_matches_tf1_resize(in_hw):
    images = np.random.default_rng(0).uniform(0, 255, size=(2,) + in_hw + (3,)).astype(np.float32)
    x = torch.from_numpy(images)
    expected = tf1_resize_bilinear(x.permute(0, 3, 1, 2), (299, 299))
    got = MatmulResize(299)(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_resize_matrix_rows_are_the_tf1_taps():
    # 2 -> 4: sources 0, 0.5, 1, 1.5 (the last clamped to the edge).
    assert resize_matrix(2, 4).tolist() == [[1, 0], [0.5, 0.5], [0, 1], [0, 1]]
    m = resize_matrix(33, 299)
    assert torch.allclose(m.sum(1), torch.ones(299)) and ((m > 0).sum(1) <= 2).all()
