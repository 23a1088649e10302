import importlib.util
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADM_REFERENCE = os.environ.get(
    "ADM_REFERENCE_DIR", os.path.join(os.path.dirname(REPO_ROOT), "shared", "adm_reference")
)

# tests/ mirrors the package (adm/, common/, methods/, run/, tables/, fetch/, evaluations/); test modules share
# fixtures and helpers across those folders by module name (from test_sampling_scripts import ckpt), as they did
# in one flat folder, so every folder is importable. Test file names are unique across the folders.
for _folder in sorted(os.listdir(os.path.dirname(os.path.abspath(__file__)))):
    _path = os.path.join(os.path.dirname(os.path.abspath(__file__)), _folder)
    if os.path.isdir(_path) and not _folder.startswith((".", "_")) and _path not in sys.path:
        sys.path.append(_path)

# Two cores are shared by everything that runs here; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


# script_util flags of a tiny class-conditional U-Net with the shape of tiny_unet_a (less its scale-shift norm):
# 32 px, 32 channels, one res block, attention at 16 and 8, four heads, learned sigmas, resblock up/down.
TINY_ADM_FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="16,8",
    num_heads=4,
    learn_sigma=True,
    class_cond=True,
    resblock_updown=True,
)


# script_util flags of the tiny U-Net the sampling-script tests save as checkpoints: 32 px, 32 channels, one res
# block, attention at 16 and 8, DDPM over 5 of 100 steps.
TINY_SAMPLING_FLAGS = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="16,8",
    diffusion_steps=100,
    timestep_respacing="5",
)


def flags(values):
    """
    Command-line tokens ["--key", "value", ...] from a dict of flags.
    """
    out = []
    for key, value in values.items():
        out += [f"--{key}", str(value)]
    return out


def tiny_flags(**extra):
    """
    The tokens of TINY_SAMPLING_FLAGS with `extra` added or overriding.
    """
    return flags({**TINY_SAMPLING_FLAGS, **extra})


def flag_args(**values):
    """
    A namespace of every guidance flag at its default (guidance_defaults) and the model flags guidance.py reads,
    with `values` overriding.
    """
    from guided_diffusion.run.guidance import guidance_defaults

    args = dict(guidance_defaults(), diffusion_steps=1000, rescale_timesteps=False, num_heads=4, seed=0)
    args.update(values)
    return SimpleNamespace(**args)


def load_script(path):
    """
    A script of the repository, loaded as a fresh module without running its main: a name in scripts/
    ("image_sample") or a path from the repository root ("evaluations/evaluator.py").
    """
    if not path.endswith(".py"):
        path = os.path.join("scripts", path + ".py")
    name = "_script_" + os.path.splitext(path)[0].replace("/", "_").replace(os.sep, "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_sample():
    """
    scripts/image_sample.py as a module, for calling its main(argv) in the test process.
    """
    return load_script("image_sample")


def reference_file(name):
    """
    Path of a file in ../shared/adm_reference, or skip the test when the folder is not beside the clone.
    """
    path = os.path.join(ADM_REFERENCE, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} not found in {ADM_REFERENCE} (the shared ADM reference data is absent)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """
    One torch thread for a module's tests (use with pytest.mark.usefixtures): tiny models gain nothing from a
    second thread, and on the shared 2-core machine it mostly waits on the other processes.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model, seed=0, std=0.1):
    """
    Random values for every parameter, in eval mode. ADM zero-initializes proj_out and the output conv, which would
    make a random model predict eps = 0 and hide any effect of the attention maps.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def randomize_zero_params(module, seed, std=0.05):
    """
    Random values for the parameters that are all zero. ADM zero-initialises the output layers, which would make
    every random model predict eps = 0 and guidance a no-op.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


# PAGGuidedModel's three ways of running the two branches, which must agree.
GUIDED_PATHS = {
    "naive": dict(batched=False),
    "batched": dict(batched=True, share_prefix=False),
    "shared_prefix": dict(batched=True, share_prefix=True),
}


def images_around_one(n, size, seed, spread):
    """
    n uint8 NHWC images scattered by +-spread levels around one random image: batches whose features vary
    enough for a full-rank covariance from few images.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, size, size, 3))
    noise = rng.integers(-spread, spread, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def grid_tiles(picture, region, size, padding):
    """
    The size x size images of a grid drawn in a picture (region: top, left, height, width of the grid without its
    outer padding; `padding` pixels between images), row by row; the region must hold whole images.
    """
    top, left, height, width = region
    step = size + padding
    rows, cols = (height + padding) // step, (width + padding) // step
    assert rows * step - padding == height and cols * step - padding == width, "the region is not a grid of images"
    return np.stack([
        picture[top + r * step : top + r * step + size, left + c * step : left + c * step + size]
        for r in range(rows)
        for c in range(cols)
    ])
