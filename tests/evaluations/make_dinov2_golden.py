"""
Write tests/evaluations/dinov2_golden.pt: the features facebookresearch/dinov2's own model computes behind EDM2's own DINOv2
detector, for a small ViT of the ViT-L/14 family with random weights in the published format. test_dinov2.py
checks evaluations/dinov2.py against it.

Neither project's code is part of this repository; this script imports both from local checkouts:

    python tests/evaluations/make_dinov2_golden.py --dinov2 DINOV2_CHECKOUT --edm2 EDM2_CHECKOUT [--out tests/evaluations/dinov2_golden.pt]

It builds dinov2's DinoVisionTransformer as its hub's dinov2_vitl14 does (518-pixel positional grid, 14-pixel
patches, LayerScale, MemEffAttention blocks, no block chunks, interpolate_offset 0.1, no antialias) at a small size,
loads evaluations.dinov2.random_dinov2_state_dict with strict=True, puts it behind EDM2's DINOv2Detector (its
torch.hub.load replaced by that model), and runs NCHW uint8 batches of two sizes through it: 256 (a downsampling
resize, as for ADM's LSUN and ImageNet samples) and 64 (an upsampling one).
"""

import argparse
import hashlib
import os
import subprocess
import sys
import warnings
from functools import partial

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from evaluations.dinov2 import ViTShape, random_dinov2_state_dict  # noqa: E402

SMALL = ViTShape(embed_dim=64, depth=2, num_heads=4)
WEIGHTS_SEED = 0
IMAGE_SEED = 1
BATCHES = {"256": (3, 256), "64": (2, 64)}


def images(seed, n, size):
    """NHWC uint8 noise with a smooth component, the same on every machine (numpy's legacy RandomState)."""
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 255, size)[None, :, None, None]
    noise = rng.randint(0, 256, size=(n, size, size, 3))
    return np.clip(0.5 * noise + 0.5 * ramp.transpose(0, 2, 1, 3), 0, 255).astype(np.uint8)


def state_sha256(state):
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def git_head(path):
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dinov2", required=True, help="a checkout of facebookresearch/dinov2")
    parser.add_argument("--edm2", required=True, help="a checkout of NVlabs/edm2")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "tests", "evaluations", "dinov2_golden.pt"))
    parser.add_argument("--dinov2_commit", default="", help="recorded in the golden (default: the checkout's HEAD)")
    parser.add_argument("--edm2_commit", default="", help="recorded in the golden (default: the checkout's HEAD)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "xFormers")
    sys.path[:0] = [args.dinov2, args.edm2]
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    model = DinoVisionTransformer(
        img_size=SMALL.pos_grid * SMALL.patch_size, patch_size=SMALL.patch_size, embed_dim=SMALL.embed_dim,
        depth=SMALL.depth, num_heads=SMALL.num_heads, mlp_ratio=SMALL.mlp_ratio, init_values=1.0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), ffn_layer="mlp", block_chunks=0,
        num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1,
    )
    state = random_dinov2_state_dict(SMALL, WEIGHTS_SEED)
    model.load_state_dict(state, strict=True)

    import calculate_metrics

    torch.hub.load = lambda *a, **k: model  # EDM2's detector takes the model from torch.hub
    detector = calculate_metrics.DINOv2Detector(resize_mode="torch")
    golden = {
        "shape": dict(SMALL.__dict__), "weights_seed": WEIGHTS_SEED, "weights_sha256": state_sha256(state),
        "image_seed": IMAGE_SEED, "batches": {},
        "dinov2_commit": args.dinov2_commit or git_head(args.dinov2),
        "edm2_commit": args.edm2_commit or git_head(args.edm2), "torch": str(torch.__version__),
    }
    with torch.no_grad():
        for name, (n, size) in BATCHES.items():
            batch = images(IMAGE_SEED, n, size)
            features = detector(torch.from_numpy(batch).permute(0, 3, 1, 2))  # EDM2 feeds NCHW uint8
            golden["batches"][name] = dict(n=n, size=size, features=features.float().clone(),
                                           images_sha256=hashlib.sha256(batch.tobytes()).hexdigest())
    torch.save(golden, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
