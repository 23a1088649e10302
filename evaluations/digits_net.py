"""
A small digit classifier whose penultimate features stand in for Inception's on 16x16 digits.

Inception-v3 features are meaningless for 16x16 grey digits, so the toy table measures FID, sFID, IS, precision
and recall in the feature space of a classifier trained on the same data (scripts/train_digits_features.py):
- pool features: the 128-d penultimate layer (FID, precision, recall),
- spatial features: the first 4 channels of the 8x8 map of the third convolution, flattened (sFID, 256-d),
- logits: the 10-way head (Inception Score; at most 10 for a perfect, balanced generator).
"""

import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .feature_nets import FeatureNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WEIGHTS = os.path.join(REPO, "models", "digits16_features.pt")
IMAGE_SIZE = 16
SPATIAL_CHANNELS = 4


class DigitsNet(FeatureNet):
    input_channels = (1, 3)

    def __init__(self, num_classes=10, name="digits16"):
        super().__init__()
        self.name = name
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc = nn.Linear(128, 128)
        self.head = nn.Linear(128, num_classes)

    def preprocess(self, images):
        """
        NHWC float in [0, 255], 1 or 3 channels, any size -> N x 1 x 16 x 16 in [-1, 1].
        """
        x = images.permute(0, 3, 1, 2).mean(dim=1, keepdim=True) / 127.5 - 1
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        spatial = F.relu(self.conv3(h))
        h = F.relu(self.conv4(spatial))
        pool = F.relu(self.fc(h.mean(dim=(2, 3))))
        return pool, spatial

    def forward(self, images):
        pool, spatial = self.features(self.preprocess(images))
        return pool, spatial[:, :SPATIAL_CHANNELS].flatten(1)

    def logits(self, pool):
        return self.head(pool)


def weights_name(path):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"digits16-{digest}"


def load_digits_net(device="cpu", path=None):
    """
    The shipped digit feature network (models/digits16_features.pt), or the weights at `path`.
    """
    path = path or os.environ.get("PAG_ADM_DIGITS_NET") or DEFAULT_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"digit feature network weights not found: {path}. They ship with the repository as "
            f"models/digits16_features.pt; rebuild them with `python scripts/train_digits_features.py`."
        )
    net = DigitsNet(name=weights_name(path))
    net.load_state_dict(torch.load(path, map_location="cpu"))
    return net.to(device).eval()
