"""
Samplers that choose the training timesteps, with importance weights that
keep the loss estimate unbiased.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """
    Create a ScheduleSampler from a name.

    :param name: "uniform" or "loss-second-moment".
    :param diffusion: the diffusion object to sample timesteps for.
    """
    if name == "uniform":
        return UniformSampler(diffusion)
    elif name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    else:
        raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    """
    A distribution over the timesteps of a diffusion process, used to reduce
    the variance of the training objective.

    Subclasses define weights(); sample() normalises them into probabilities
    and returns importance weights 1 / (T * p(t)), so that the weighted loss
    has the same expectation as with uniform sampling.
    """

    @abstractmethod
    def weights(self):
        """
        A numpy array of positive weights, one per timestep.
        """

    def sample(self, batch_size, device):
        """
        Importance-sample timesteps for a batch.

        Uses numpy's global random state (np.random.choice).

        :param batch_size: the number of timesteps.
        :param device: the torch device to put the results on.
        :return: a tuple (timesteps, weights): a long tensor of indices and a
                 float tensor of loss weights.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    def update_with_local_losses(self, local_ts, local_losses):
        """
        Update the reweighting with this process's losses.

        When torch.distributed is initialized, the losses of all ranks are
        gathered first, so every rank updates identically and keeps the same
        weights; otherwise only the local losses are used.

        :param local_ts: an integer tensor of timesteps.
        :param local_losses: a 1-D tensor of the losses at those timesteps.
        """
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(
                [int(x) for x in local_ts.tolist()],
                [float(x) for x in local_losses.tolist()],
            )
            return

        batch_sizes = [
            th.tensor([0], dtype=th.int32, device=local_ts.device)
            for _ in range(dist.get_world_size())
        ]
        dist.all_gather(
            batch_sizes,
            th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device),
        )
        batch_sizes = [x.item() for x in batch_sizes]
        max_bs = max(batch_sizes)

        # all_gather needs equal shapes, so pad every rank's batch to the
        # largest and drop the padding afterwards.
        timestep_batches = [th.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [th.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        padded_ts = th.zeros(max_bs).to(local_ts)
        padded_ts[: len(local_ts)] = local_ts
        padded_losses = th.zeros(max_bs).to(local_losses)
        padded_losses[: len(local_losses)] = local_losses
        dist.all_gather(timestep_batches, padded_ts)
        dist.all_gather(loss_batches, padded_losses)
        timesteps = [
            int(x.item()) for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]
        ]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """
        Update the reweighting with the losses of a whole (global) batch.

        Every rank must call this with the same arguments, in the same order,
        for the weights to stay in sync.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Sample t with probability proportional to sqrt(E[L_t^2]), estimated from
    the last history_per_term losses at t (Nichol & Dhariwal, section 3.3).
    Uniform until every timestep has a full history, and always mixed with a
    little uniform probability so that no timestep is starved.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros(
            [diffusion.num_timesteps, history_per_term], dtype=np.float64
        )
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full history: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
