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

A batch's noise is the stack of its samples' draws (PerSampleNoise), so what sample i becomes depends on S and i
only, not on the batch size, the number of ranks or which batch or rank it lands in. Draws happen on the CPU and
are then moved to the model's device, so the streams are the same on every device. (The model itself may round
differently for different batch shapes on some backends; the random streams never do.)
"""

import numpy as np
import torch as th


def sample_generator(seed, index):
    """
    The CPU generator that owns every random draw of sample `index` (see the module docstring).
    """
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(2, np.uint32)
    gen = th.Generator(device="cpu")
    gen.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return gen


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
