"""
Per-sample random streams: what makes a sample depend on the seed and its index only.

Sample i of a run with --seed S owns one CPU torch.Generator, seeded from numpy's
SeedSequence(S, spawn_key=(i,)) (the i-th child of SeedSequence(S)). From it, and from nothing else, the sample
takes in this order:

  1. its class label, one randint(NUM_CLASSES) draw, when the script draws labels (image_sample.py with a
     class-conditional model, classifier_sample.py always; super_res_sample.py takes them from its base samples);
  2. its starting noise x_T, one standard normal draw shaped (C, H, W);
  3. one standard normal draw shaped (C, H, W) each time the sampler asks for noise, i.e. once per step in the
     diffusion's own draw order (p_sample and ddim_sample both draw at every step, the last one included).

The random attention perturbations of PAG's ablation (--pag_perturbation mask, drop, noise) draw from a second
generator per sample, seeded from SeedSequence(S, spawn_key=(i, PERTURBATION_STREAM)), so they never shift the
draws above: at every forward pass of the perturbed branch, each perturbed attention block (in module order)
takes one draw shaped (heads, T, T) for the sample's own map, as the official modules draw one shaped like the
whole batch's map. The samplers call the perturbed branch once per step, so these draws are a function of S, i
and the step. The maps are large (T^2 per head: 1024^2 at ADM-256's 32x32 blocks), so this generator lives on
the maps' device: on the CPU the numbers are the same everywhere; a CUDA generator seeded the same way gives
other numbers than the CPU's, and torch's CUDA generator may lay its draws out by the GPU's size, so across
ranks they agree on GPUs of one model.

A batch's noise is the stack of its samples' draws (PerSampleNoise), so what sample i draws depends on S and i
only, not on the batch size, the number of ranks or which batch or rank it lands in. Draws happen on the CPU and
are then moved to the model's device, so the streams are the same on every device. What a sample becomes is then
bit-identical across rank counts and resumes at the same batch size, thread count and kernel set; the model's
own arithmetic may round differently for another batch size or thread count (see docs/determinism.md), the
random streams never do.

batch_streams(S, indices) tells the code inside it which samples a batch holds (the scripts' run_store sets it
around every batch); without it the random perturbations draw from torch's global generator, as the official
code does.
"""

import contextlib

import numpy as np
import torch as th

# The spawn-key tag of a sample's perturbation generator (its sampling generator has spawn key (i,)).
PERTURBATION_STREAM = 1


def _generator(seed, spawn_key, device="cpu"):
    state = np.random.SeedSequence(seed, spawn_key=spawn_key).generate_state(2, np.uint32)
    gen = th.Generator(device=device)
    gen.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return gen


def sample_generator(seed, index):
    """
    The CPU generator that owns every random draw of sample `index` (see the module docstring).
    """
    return _generator(seed, (index,))


def perturbation_generator(seed, index, device="cpu"):
    """
    The generator of sample `index`'s random attention perturbations (see the module docstring), on `device`.
    """
    return _generator(seed, (index, PERTURBATION_STREAM), device)


class SampleBatch:
    """
    The samples of one batch: the run's seed and the sample index of every batch row.
    """

    def __init__(self, seed, indices):
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self._perturbation_generators = {}

    def perturbation_generators(self, device="cpu"):
        """
        One perturbation generator per row on the maps' device, made on first use and then consumed across the
        batch's steps.
        """
        device = th.device(device)
        if device not in self._perturbation_generators:
            self._perturbation_generators[device] = [perturbation_generator(self.seed, i, device) for i in self.indices]
        return self._perturbation_generators[device]


_current_batch = None


@contextlib.contextmanager
def batch_streams(seed, indices):
    """
    Within the context, the batch being sampled holds the samples `indices` of a run with seed `seed`.
    """
    global _current_batch
    previous = _current_batch
    _current_batch = SampleBatch(seed, indices)
    try:
        yield _current_batch
    finally:
        _current_batch = previous


def current_batch():
    """
    The SampleBatch of the enclosing batch_streams context, or None.
    """
    return _current_batch


def draw_labels(generators, num_classes):
    return th.stack([th.randint(num_classes, (), generator=g) for g in generators])


class PerSampleNoise:
    """
    A noise source for the diffusion's sampling loops (its noise_fn): each call returns a tensor like x whose
    row k is the next standard normal draw of generator k.
    """

    def __init__(self, generators):
        self.generators = list(generators)

    def __call__(self, x):
        return self.draw(x.shape, x.device, x.dtype)

    def draw(self, shape, device, dtype=th.float32):
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} asked from {len(self.generators)} generators")
        rows = [th.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return th.stack(rows).to(device=device, dtype=dtype)
