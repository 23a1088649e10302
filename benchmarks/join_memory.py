"""
Peak memory of the sampler's final join (run_store.join_parts: parts -> samples_NxHxWx3.npz) and of
merge_shards, relative to the size of the result, on synthetic parts of a chosen total size.

Each operation runs in a fresh child process, which reports its resident memory just before the operation
(VmRSS) and its peak afterwards (VmHWM, from /proc/self/status); the growth (peak - before) is printed as a
fraction of the result's size. As the baseline, measured in the same run, the earlier join: every part loaded,
np.concatenate, np.savez (about 2x the result).

Example (about a minute and 6 GB of free disk for the default 1.5 GB):
  python benchmarks/join_memory.py --total_gb 1.5
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_status(field):
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: the peak so far), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build_parts(folder, total_bytes, image_size=256, batch_size=64, seed=0):
    """
    Synthetic sampler parts (uint8 images and int64 labels, as a class-conditional run writes them) of about
    total_bytes of images in folder/samples_NxHxWx3_parts, and the run's two shard files in folder/shards (as
    two --shard runs write them). :return: (num_samples, image_shape).
    """
    from guided_diffusion.common.atomic_io import save_npz_atomic
    from guided_diffusion.common.npz_stream import join_npz, npz_layout
    from guided_diffusion.run.run_store import output_paths, part_name

    image_shape = (image_size, image_size, 3)
    num_samples = max(2, total_bytes // int(np.prod(image_shape)))
    _, parts_dir = output_paths(folder, num_samples, image_shape)
    os.makedirs(parts_dir)
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, num_samples, batch_size):
        end = min(start + batch_size, num_samples)
        images = np.frombuffer(rng.bytes((end - start) * int(np.prod(image_shape))), np.uint8)
        labels = rng.integers(0, 1000, end - start)
        paths.append(os.path.join(parts_dir, part_name(start, end)))
        save_npz_atomic(paths[-1], [images.reshape(end - start, *image_shape), labels])
    shards = os.path.join(folder, "shards")
    half = len(paths) // 2
    edges = [0, half * batch_size, num_samples]
    for index, chunk in enumerate((paths[:half], paths[half:])):
        shard_path = output_paths(shards, num_samples, image_shape, (index, 2))[0]
        sources = [(p, npz_layout(p)) for p in chunk]
        extra = {"sample_range": np.array([edges[index], edges[index + 1]])}
        join_npz(shard_path, sources, ["arr_0", "arr_1"], extra)
    return num_samples, image_shape


def _child(kind, folder, num_samples, image_size):
    from types import SimpleNamespace

    from guided_diffusion.run.run_store import SamplingPlan, merge_shards, output_paths

    image_shape = (image_size, image_size, 3)
    final, parts_dir = output_paths(folder, num_samples, image_shape)
    before = proc_status("VmRSS")
    if kind == "join":
        plan = SamplingPlan(folder, None, 0, num_samples, final, parts_dir, "", [], [], [])
        from guided_diffusion.run.run_store import join_parts

        error = join_parts(plan, image_shape, SimpleNamespace(out_dir=folder))
        if error:
            raise SystemExit(error)
    elif kind == "merge":
        final = merge_shards(os.path.join(folder, "shards"))
    elif kind == "concatenate":
        from guided_diffusion.run.run_store import finished_ranges, part_name

        columns = [[], []]
        for start, end in finished_ranges(parts_dir):
            with np.load(os.path.join(parts_dir, part_name(start, end))) as data:
                columns[0].append(data["arr_0"])
                columns[1].append(data["arr_1"])
        final = final[: -len(".npz")] + "_concatenated.npz"
        np.savez(final, *[np.concatenate(c) for c in columns])
    print(json.dumps({"before": before, "peak": proc_status("VmHWM"), "result": os.path.getsize(final), "path": final}))


def run_child(script, *args):
    """
    Run `script --child ARGS...` in a fresh process (so that its peak memory is its own) and return the JSON object
    it prints last.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), "--child", *map(str, args)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(kind, folder, num_samples, image_size):
    """
    Run one operation in a child process. :return: {"before", "peak", "result" (bytes), "path"}.
    """
    return run_child(__file__, kind, folder, num_samples, image_size)


def run(total_bytes, folder, kinds=("join", "merge", "concatenate"), image_size=256, batch_size=64):
    """
    Build the parts and measure each kind. :return: {kind: measurement}, each with "growth" = (peak - before) /
    result.
    """
    num_samples, _ = build_parts(folder, total_bytes, image_size, batch_size)
    results = {}
    for kind in kinds:
        result = measure(kind, folder, num_samples, image_size)
        result["growth"] = (result["peak"] - result["before"]) / result["result"]
        results[kind] = result
        if kind == "concatenate":
            os.remove(result["path"])  # only there to be measured
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--total_gb", type=float, default=1.5, help="size of the joined images (GB)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64, help="samples per part")
    parser.add_argument("--folder", default="", help="where the parts go (default: a temporary folder, removed)")
    parser.add_argument("--skip_baseline", action="store_true", help="do not measure the earlier (2x) join")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, num_samples, image_size = args.child
        _child(kind, folder, int(num_samples), int(image_size))
        return
    folder = args.folder or tempfile.mkdtemp(prefix="join_memory-")
    kinds = ("join", "merge") + (() if args.skip_baseline else ("concatenate",))
    try:
        results = run(int(args.total_gb * 1e9), folder, kinds, args.image_size, args.batch_size)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    names = {"join": "final join (streamed)", "merge": "merge_shards (streamed)", "concatenate": "earlier join"}
    result_mib = next(iter(results.values()))["result"] / 2**20
    print(f"result: {result_mib:.0f} MiB ({args.image_size}x{args.image_size} images, {args.batch_size} per part)")
    for kind, r in results.items():
        print(
            f"{names[kind]:26s} RSS before {r['before'] / 2**20:7.0f} MiB, peak {r['peak'] / 2**20:7.0f} MiB, "
            f"growth {(r['peak'] - r['before']) / 2**20:7.0f} MiB = {r['growth']:.3f} x result"
        )
    if "concatenate" in results:
        print(f"streamed join peak / earlier join peak: {results['join']['peak'] / results['concatenate']['peak']:.3f}")


if __name__ == "__main__":
    main()
