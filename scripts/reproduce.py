"""
Reproduce table rows: for each config, sample with the config's script, evaluate the samples against the
reference batch, write results/<name>/metrics.json, then results/table.md and results/table.json with every result
the results folder holds.

    python scripts/reproduce.py 'adm256_*' --mpi 8 -- --batch_size 32
    python scripts/reproduce.py 'adm256_*' --launcher torchrun --nproc 8 -- --batch_size 32
    python scripts/reproduce.py 'digits16_*'

CONFIG is a config name (configs/NAME.cfg), a path, or a glob over config names. Flags after `--` go to the
sampler. Finished rows (same flags, sample count, reference batch and feature network) are not redone, and an
interrupted row resumes where it stopped. See docs/reproduce.md.
"""

import argparse
import os
import signal
import sys

from evaluations.device import resolve_device
from guided_diffusion.common.errors import REPO_ROOT, OneLineErrorParser
from guided_diffusion.run.flag_files import CONFIG_DIR
from guided_diffusion.tables.results_table import write_table
from guided_diffusion.tables.row_runner import log, output_problem, run_rows
from guided_diffusion.tables.sampler_launch import LAUNCHERS, launch_settings, sampler_env
from guided_diffusion.tables.table_rows import ReproduceError, select_configs


def create_argparser():
    parser = OneLineErrorParser(
        usage="%(prog)s [options] CONFIG [CONFIG ...] [-- SAMPLER FLAGS ...]",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="config names, paths or globs ('digits16_*')")
    parser.add_argument("--ref_batch", help="reference batch for every row (default: the config's ref_batch)")
    parser.add_argument("--num_samples", type=int, help="samples per row (default: the config's)")
    parser.add_argument(
        "--launcher", choices=LAUNCHERS,
        help="how to start the sampler's ranks: mpiexec -n N, torchrun --standalone --nproc_per_node N (one node), "
        "srun --ntasks N (inside a SLURM allocation), or none (one process); default mpiexec with --nproc, else none",
    )
    parser.add_argument("--nproc", type=int, help="number of sampler ranks for --launcher")
    parser.add_argument("--mpi", type=int, help="sample with `mpiexec -n MPI` (the same as --launcher mpiexec --nproc MPI)")
    parser.add_argument("--results", default=os.path.join(REPO_ROOT, "results"), help="results folder")
    parser.add_argument("--feature_net", help="evaluator feature network (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=64, help="evaluator images per forward pass")
    parser.add_argument(
        "--device",
        help="device of the sampler and the evaluator: cpu, cuda or cuda:N (default: cuda if available)",
    )
    parser.add_argument("--inception_path", help="Inception weights (see evaluations/README.md)")
    parser.add_argument("--model_dir", help="folder holding the checkpoints the configs name")
    parser.add_argument("--keep_going", action="store_true", help="go on with the other rows after an error")
    parser.add_argument(
        "--seeds",
        help="comma-separated sampling seeds, e.g. 0,1,2: each row is sampled and evaluated once per seed (in "
        "results/<row>/seed<k>/) and the table gives the mean and standard deviation over them",
    )
    parser.add_argument("--config_dir", default=CONFIG_DIR, help="where names and globs are looked up")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = create_argparser()
    opts = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    check_options(parser, opts, extra)
    try:
        rows = select_configs(opts.configs, opts.config_dir)
    except ReproduceError as exc:
        parser.error(str(exc))
    problem = output_problem(opts, rows)
    if problem:
        sys.stderr.write(f"{parser.prog}: error: {problem}\n")
        return 2

    try:
        # The evaluator's check (a device this machine has), then the sampler's placement.
        opts.device = resolve_device(opts.device)
        sampler_env(opts.device)
    except (ReproduceError, ValueError) as exc:
        parser.error(str(exc))

    this_call, failures = run_rows(rows, opts, extra)
    results = os.path.abspath(opts.results)
    # This call's rows and every earlier result in the folder, so no call narrows the table to its own rows.
    table_md, earlier = write_table(results, this_call)
    log(f"wrote {table_md}" + (f" ({earlier} of its lines from earlier runs in {results})" if earlier else ""))
    if failures:
        log(f"{len(failures)} of {len(rows)} rows failed: {', '.join(failures)} (see the errors above)")
        return 1
    return 0


def check_options(parser, opts, extra):
    """
    Refuse contradictory or out-of-range options (argparse's one-line error, exit status 2); --seeds becomes a
    list of integers.
    """
    if opts.mpi is not None and opts.mpi < 1:
        parser.error(f"--mpi must be at least 1, got {opts.mpi}")
    try:
        launch_settings(opts)
    except ValueError as exc:
        parser.error(str(exc))
    if opts.num_samples is not None and opts.num_samples < 1:
        parser.error(f"--num_samples must be positive, got {opts.num_samples}")
    if opts.seeds is not None:
        try:
            opts.seeds = [int(seed) for seed in opts.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers such as 0,1,2, got {opts.seeds!r}")
        if len(set(opts.seeds)) != len(opts.seeds) or min(opts.seeds) < 0:
            parser.error(f"--seeds must be distinct non-negative integers, got {opts.seeds}")
        if "--seed" in extra:
            parser.error("--seed after `--` conflicts with --seeds: give the seeds with --seeds only")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_command_line(argv=None):
    # A SIGTERM (a scheduler ending the job, `kill`) takes the same way out as Ctrl-C: the running sampler is
    # stopped and the message says how to resume.
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.stderr.write(
            "\nreproduce.py: interrupted. Finished rows and finished sample batches are kept: rerun the same command "
            "to resume where it stopped.\n"
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(run_command_line())
