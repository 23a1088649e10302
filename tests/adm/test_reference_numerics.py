"""
Our models reproduce the outputs the original implementation computed for the shared tiny reference models.
"""

import torch

from guided_diffusion import script_util as su

from conftest import reference_file


def test_tiny_unet_matches_original():
    ref = torch.load(reference_file("tiny_unet_a.pt"))
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **ref["flags"]})
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["x"], ref["t"], **ref["model_kwargs"])
    assert out.shape == ref["out"].shape
    assert (out - ref["out"]).abs().max().item() < 1e-5
    names = [n for n, m in model.named_modules() if type(m).__name__ == "AttentionBlock"]
    assert names == ref["attention_blocks"]


def test_tiny_classifier_matches_original():
    ref = torch.load(reference_file("tiny_classifier.pt"))
    args = {**su.classifier_defaults(), **ref["flags"]}
    classifier = su.create_classifier(**{k: args[k] for k in su.classifier_defaults()})
    classifier.load_state_dict(ref["state_dict"], strict=True)
    classifier.eval()
    with torch.no_grad():
        out = classifier(ref["x"], ref["t"])
    assert out.shape == ref["out"].shape == (3, 1000)
    assert (out - ref["out"]).abs().max().item() < 1e-5
