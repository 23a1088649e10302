"""
Join the shard files of a row sampled as independent jobs (--shard i/n on image_sample.py, classifier_sample.py,
super_res_sample.py or inverse_sample.py) into the single samples_NxHxWx3.npz that one run of the whole row
writes: same arrays, same order, bit for bit (with the same --seed and --batch_size on every shard), streamed in
bounded memory, with the run record (samples_NxHxWx3.json) one run would keep beside it.
"""

from guided_diffusion.common.errors import OneLineErrorParser, UsageError
from guided_diffusion.run.image_output import GRID_MAX_IMAGES, first_samples, save_grid
from guided_diffusion.common.npz_stream import npz_heads
from guided_diffusion.run.run_store import grid_path, merge_shards


def main(argv=None):
    parser = OneLineErrorParser(description=" ".join(__doc__.split()))
    parser.add_argument("folder", help="the output folder (--out_dir) the shards wrote their samples_*_shardIofN.npz to")
    parser.add_argument("--grid", default="", help="also write a PNG grid of the first samples (a bare name goes "
                                                    "into the folder)")
    args = parser.parse_args(argv)
    grid = grid_path(args.grid, args.folder)
    try:
        path = merge_shards(args.folder, grid=grid)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"merged into {path}")
    if grid:
        # The first samples only: the merged file may be far larger than memory.
        save_grid(grid, first_samples(npz_heads(path, GRID_MAX_IMAGES)))
        print(f"grid of the first samples in {grid}")
    return path


if __name__ == "__main__":
    main()
