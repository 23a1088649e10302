"""
Tests for guided_diffusion.resample: timestep samplers and their weights.
"""

import os
import tempfile

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
import torch.multiprocessing as mp

from guided_diffusion.resample import (
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)


class FakeDiffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps


def test_create_named_schedule_sampler():
    diffusion = FakeDiffusion(10)
    assert type(create_named_schedule_sampler("uniform", diffusion)) is UniformSampler
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert type(sampler) is LossSecondMomentResampler
    assert isinstance(sampler, LossAwareSampler) and isinstance(sampler, ScheduleSampler)
    with pytest.raises(NotImplementedError, match="unknown schedule sampler: bogus"):
        create_named_schedule_sampler("bogus", diffusion)


def test_uniform_sampler():
    sampler = UniformSampler(FakeDiffusion(7))
    assert np.array_equal(sampler.weights(), np.ones(7))
    np.random.seed(0)
    t, w = sampler.sample(1000, th.device("cpu"))
    assert t.dtype == th.long and w.dtype == th.float32
    assert t.shape == w.shape == (1000,)
    assert t.min() >= 0 and t.max() <= 6
    assert len(set(t.tolist())) == 7
    assert (w == 1).all()
    # The draw uses numpy's global state via np.random.choice.
    np.random.seed(0)
    assert np.array_equal(t.numpy(), np.random.choice(7, size=(1000,), p=np.full(7, 1 / 7)))


def test_loss_second_moment_warm_up_and_weights():
    num_timesteps, history = 4, 3
    sampler = LossSecondMomentResampler(FakeDiffusion(num_timesteps), history_per_term=history, uniform_prob=0.1)
    losses = {0: [1.0, 2.0, 3.0], 1: [0.5, 0.5, 0.5], 2: [4.0, 0.0, 4.0], 3: [1.0, 1.0, 1.0]}
    # Fill all but the last entry of timestep 3: still uniform.
    for step in range(history):
        ts = [t for t in range(num_timesteps) if not (t == 3 and step == history - 1)]
        sampler.update_with_all_losses(ts, [losses[t][step] for t in ts])
        assert np.array_equal(sampler.weights(), np.ones(num_timesteps))
    sampler.update_with_all_losses([3], [1.0])

    rms = np.array([np.sqrt(np.mean(np.square(losses[t]))) for t in range(num_timesteps)])
    expected = rms / rms.sum() * 0.9 + 0.1 / num_timesteps
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    assert sampler.weights().sum() == pytest.approx(1.0)

    # Importance weights are 1 / (T p(t)).
    np.random.seed(1)
    t, w = sampler.sample(500, "cpu")
    np.testing.assert_allclose(w.numpy(), 1 / (num_timesteps * expected[t.numpy()]), rtol=1e-6)
    # Unbiased: the expected weight under p is 1.
    assert float((expected * (1 / (num_timesteps * expected))).sum()) == pytest.approx(1.0)


def test_loss_second_moment_history_is_a_sliding_window():
    sampler = LossSecondMomentResampler(FakeDiffusion(2), history_per_term=3)
    sampler.update_with_all_losses([0, 0, 0, 0, 0, 1], [1.0, 2.0, 3.0, 4.0, 5.0, 9.0])
    np.testing.assert_array_equal(sampler._loss_history[0], [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(sampler._loss_counts, [3, 1])
    np.testing.assert_array_equal(sampler._loss_history[1], [9.0, 0.0, 0.0])


def test_update_with_local_losses_without_process_group():
    assert not dist.is_initialized()
    sampler = LossSecondMomentResampler(FakeDiffusion(3), history_per_term=2)
    sampler.update_with_local_losses(th.tensor([0, 1, 2, 0]), th.tensor([1.0, 2.0, 3.0, 5.0]))
    np.testing.assert_array_equal(sampler._loss_counts, [2, 1, 1])
    np.testing.assert_array_equal(sampler._loss_history[0], [1.0, 5.0])
    np.testing.assert_array_equal(sampler._loss_history[2], [3.0, 0.0])


def _gather_worker(rank, world_size, init_file, result_file):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        sampler = LossSecondMomentResampler(FakeDiffusion(5), history_per_term=2)
        # Unequal local batch sizes across ranks.
        if rank == 0:
            sampler.update_with_local_losses(th.tensor([0, 1, 2]), th.tensor([1.0, 2.0, 3.0]))
        else:
            sampler.update_with_local_losses(th.tensor([4]), th.tensor([7.0]))
        if rank == 1:
            np.save(result_file, np.concatenate([sampler._loss_history.ravel(), sampler._loss_counts]))
    finally:
        dist.destroy_process_group()


def test_update_with_local_losses_gathers_across_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        result_file = os.path.join(tmp, "result.npy")
        mp.spawn(_gather_worker, args=(2, init_file, result_file), nprocs=2, join=True)
        result = np.load(result_file)
    history, counts = result[:10].reshape(5, 2), result[10:]
    # Rank 1 sees rank 0's losses too, in rank order.
    np.testing.assert_array_equal(counts, [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(history[:, 0], [1.0, 2.0, 3.0, 0.0, 7.0])
