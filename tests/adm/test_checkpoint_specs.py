"""
Every released ADM checkpoint's architecture, rebuilt from its flags, has exactly the released state-dict keys,
shapes and attention-block names.
"""

import json

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.unet import AttentionBlock

from conftest import reference_file


def _specs():
    with open(reference_file("state_dict_specs.json")) as f:
        return json.load(f)


def build_from_flags(name, flags):
    # The meta device gives shapes without allocating or initialising 500M parameters.
    with torch.device("meta"):
        if name.endswith("_classifier"):
            args = {**su.classifier_defaults(), **flags}
            return su.create_classifier(**{k: args[k] for k in su.classifier_defaults()})
        if "upsampler" in name:
            return su.sr_create_model_and_diffusion(**{**su.sr_model_and_diffusion_defaults(), **flags})[0]
        return su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})[0]


SPEC_NAMES = [
    "64x64_diffusion",
    "128x128_diffusion",
    "256x256_diffusion",
    "256x256_diffusion_uncond",
    "512x512_diffusion",
    "64x64_classifier",
    "128x128_classifier",
    "256x256_classifier",
    "512x512_classifier",
    "64_256_upsampler",
    "128_512_upsampler",
]


def test_spec_file_lists_every_released_checkpoint():
    assert sorted(_specs()) == sorted(SPEC_NAMES)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_state_dict_matches_release(name):
    spec = _specs()[name]
    model = build_from_flags(name, spec["flags"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = [(k, list(v)) for k, v in spec["state_dict"].items()]
    assert [k for k, _ in got] == [k for k, _ in want]
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    attention = [n for n, m in model.named_modules() if isinstance(m, AttentionBlock)]
    assert attention == spec["attention_blocks"]


@pytest.mark.parametrize("name", ["256x256_diffusion", "64x64_classifier", "64_256_upsampler"])
def test_release_shaped_state_dict_loads_strict(name):
    # A state dict with the released keys and shapes loads with strict=True (assign keeps it on meta).
    spec = _specs()[name]
    model = build_from_flags(name, spec["flags"])
    with torch.device("meta"):
        fake = {k: torch.empty(v) for k, v in spec["state_dict"].items()}
    model.load_state_dict(fake, strict=True, assign=True)


def test_wrong_class_cond_names_the_flag():
    spec = _specs()["256x256_diffusion"]
    model = build_from_flags("256x256_diffusion_uncond", _specs()["256x256_diffusion_uncond"]["flags"])
    with torch.device("meta"):
        fake = {k: torch.empty(v) for k, v in spec["state_dict"].items()}
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(fake)
    msg = str(err.value)
    assert "unexpected keys (1): label_emb.weight" in msg
    assert "Most likely wrong flag: --class_cond True" in msg
