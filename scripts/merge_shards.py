"""
Join the shard files of a row sampled as independent jobs (--shard i/n on image_sample.py, classifier_sample.py,
super_res_sample.py or inverse_sample.py) into the single samples_NxHxWx3.npz that one run of the whole row
writes: same arrays, same order, bit for bit (with the same --seed and --batch_size on every shard).
"""

import numpy as np

from guided_diffusion.common.errors import OneLineErrorParser, UsageError
from guided_diffusion.run.image_output import first_samples, save_grid
from guided_diffusion.run.run_store import grid_path, merge_shards


def main(argv=None):
    parser = OneLineErrorParser(description=" ".join(__doc__.split()))
    parser.add_argument("folder", help="the output folder (--out_dir) the shards wrote their samples_*_shardIofN.npz to")
    parser.add_argument("--grid", default="", help="also write a PNG grid of the first samples (a bare name goes "
                                                    "into the folder)")
    args = parser.parse_args(argv)
    try:
        path = merge_shards(args.folder)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"merged into {path}")
    if args.grid:
        with np.load(path) as data:
            arrays = [data[k] for k in data.files]
        grid = grid_path(args.grid, args.folder)
        save_grid(grid, first_samples(arrays))
        print(f"grid of the first samples in {grid}")
    return path


if __name__ == "__main__":
    main()
