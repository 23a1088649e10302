"""
Train the digit classifier whose features evaluate the embedded digits model (evaluations/digits_net.py).

Fixed seed, 80/20 train/validation split of scikit-learn's digits (or a given npz), small random shifts as
augmentation. Writes the weights atomically and prints the validation accuracy.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from evaluations.digits_net import DEFAULT_WEIGHTS, DigitsNet
from guided_diffusion.common.atomic_io import torch_save_atomic
from guided_diffusion.common.digits_dataset import load_digits_images


def load_dataset(path):
    if path:
        with np.load(path) as data:
            return data["arr_0"], data["arr_1"]
    return load_digits_images(16)


def random_shift(x, generator, max_shift=1):
    # Shift each image by up to one pixel: cheap augmentation that keeps digits intact.
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="", help="npz with arr_0 images and arr_1 labels (default: sklearn)")
    parser.add_argument("--out", default=DEFAULT_WEIGHTS, help=f"where the weights go (default: {DEFAULT_WEIGHTS})")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default: 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_dataset(args.data)
    order = np.random.RandomState(args.seed).permutation(len(images))
    split = int(0.8 * len(images))
    net = DigitsNet()
    x = net.preprocess(torch.from_numpy(images).float())
    y = torch.from_numpy(labels).long()
    train, val = order[:split], order[split:]

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    for epoch in range(args.epochs):
        net.train()
        perm = torch.from_numpy(train)[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(perm), 64):
            idx = perm[start : start + 64]
            pool, _ = net.features(random_shift(x[idx], generator))
            loss = F.cross_entropy(net.logits(pool), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pool, _ = net.features(x[torch.from_numpy(val)])
        accuracy = (net.logits(pool).argmax(1) == y[torch.from_numpy(val)]).float().mean().item()
    torch_save_atomic(net.state_dict(), args.out)
    record = dict(validation_accuracy=round(accuracy, 4), epochs=args.epochs, seed=args.seed,
                  train_images=len(train), validation_images=len(val))
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
