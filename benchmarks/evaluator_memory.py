"""
How the evaluator's memory grows with the number of samples, with the digits feature network (random weights) on
synthetic 16x16 batches.

Each measurement runs in a fresh child process, which reports its peak resident memory (VmHWM, /proc/self/status).
Printed, per sample, in one run:
  embedding   peak growth of embedding one batch (Evaluator.read_activations) divided by its size: what the
              kept features cost, stored as now and, as the baseline, the earlier way: views of the network's
              feature maps (which kept the whole conv3 map of each batch), joined at the end;
  evaluate    (peak at 3N - peak at 2N) / N of a whole evaluation of as many references as samples. Both sizes
              should exceed precision/recall's block of 10,000 x 10,000 distances (ADM's row and column batch),
              whose temporaries (about 1.4 GB) are the evaluation's fixed peak: below it the peak grows
              with the block, not with what is kept per sample.

Example (about ten minutes on two cores):
  python benchmarks/evaluator_memory.py --num_images 10000
"""

import argparse
import json
import os
import tempfile

import numpy as np

# The sibling benchmark's child-process runner and /proc reader (this folder is sys.path[0] when run as a script).
from join_memory import proc_status, run_child


def _batch(path, count, seed):
    np.savez(path, np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8))


def _child(kind, folder, count):
    import torch

    from evaluations import feature_nets
    from evaluations.digits_net import DigitsNet
    from evaluations.evaluator import Evaluator

    torch.set_num_threads(1)
    if kind == "embed_views":
        # The earlier way: numpy views of the network's outputs (whatever storage they share) kept per batch and
        # joined at the end.
        feature_nets._flat_numpy = lambda tensor, net, what, n: tensor.reshape(n, -1).float().cpu().numpy()
        joined = Evaluator.compute_activations
        Evaluator.compute_activations = lambda self, batches, total=None, num_images=None: joined(self, batches)
    torch.manual_seed(0)
    evaluator = Evaluator(DigitsNet().eval(), batch_size=250, progress=False)
    ref, sample = os.path.join(folder, f"ref{count}.npz"), os.path.join(folder, f"sample{count}.npz")
    before = proc_status("VmRSS")
    with torch.no_grad():
        if kind.startswith("embed"):
            acts = evaluator.read_activations(ref)
            assert len(acts) == count
        else:
            evaluator.evaluate(ref, sample, use_cache=False)
    print(json.dumps({"before": before, "peak": proc_status("VmHWM")}))


def measure(kind, folder, count):
    return run_child(__file__, kind, folder, count)


def main():
    parser = argparse.ArgumentParser(description="How the evaluator's memory grows with the number of samples.")
    parser.add_argument("--num_images", type=int, default=10000, help="N: batches of 2N and 3N images are evaluated")
    parser.add_argument("--skip_evaluate", action="store_true", help="only the embedding")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, count = args.child
        _child(kind, folder, int(count))
        return
    n = args.num_images
    with tempfile.TemporaryDirectory(prefix="evaluator_memory-") as folder:
        for count in (2 * n, 3 * n):
            _batch(os.path.join(folder, f"ref{count}.npz"), count, 1)
            _batch(os.path.join(folder, f"sample{count}.npz"), count, 2)
        for kind, label in (("embed", "owned, filled in place (now)"), ("embed_views", "views, joined (before)")):
            r = measure(kind, folder, 2 * n)
            print(f"embedding {2 * n} images, {label:28s}: {(r['peak'] - r['before']) / (2 * n) / 1024:6.2f} KiB/image")
        if not args.skip_evaluate:
            small, large = measure("evaluate", folder, 2 * n), measure("evaluate", folder, 3 * n)
            peaks = f"{small['peak'] / 2**20:.0f} MiB -> {large['peak'] / 2**20:.0f} MiB"
            print(f"evaluate {2 * n} vs {3 * n}: peak {peaks}, "
                  f"{(large['peak'] - small['peak']) / n / 1024:.2f} KiB per added sample (and reference image)")


if __name__ == "__main__":
    main()
