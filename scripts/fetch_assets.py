"""
Download and verify the released files the scripts need: ADM's checkpoints and reference batches, the FID
Inception weights, the DINOv2 ViT-L/14 weights of FD_DINOv2, the LPIPS weights, and (as a manual download it checks) DPS's FFHQ model. This is the only
command that downloads anything, and only the files named.

    python scripts/fetch_assets.py adm256_uncond_ddpm250_pag     # what one table row needs
    python scripts/fetch_assets.py 'adm256_*'                    # every row of the ImageNet 256 table
    python scripts/fetch_assets.py adm256 eval-imagenet256       # groups
    python scripts/fetch_assets.py 256x256_classifier.pt --dest /data/adm
    python scripts/fetch_assets.py --list

NAME is a file name (see --list), a group (adm64, adm128, adm256, adm512, upsamplers, lsun, inception, dinov2,
eval-imagenet64, eval-imagenet128, eval-imagenet256, eval-imagenet512, eval-lsun, lpips, lpips-alex, ffhq-dps), or a
config (configs/NAME.cfg, a path, or a quoted glob over config names): the checkpoints its --model_path and
--classifier_path name, its reference batch and its feature network's weights.

Each file streams into NAME.part beside its destination with a progress bar; an interrupted download resumes from
there (HTTP Range) when the same command runs again. It is renamed into place only once complete (the size the
server announced) and verified: ADM's checkpoints load with strict=True into the architecture of ADM's README
flags (DPS's into that of configs/ffhq256/ffhq256_model.cfg), reference batches are npz files of uint8 images, the
Inception and torchvision weights match the sha256 prefix in their names, DINOv2's have exactly the keys and
shapes of ViT-L/14, LPIPS's linear layers have LPIPS v0.1's shapes. A file already in place and verified is skipped. See docs/reproduce.md.
"""

import argparse
import fnmatch
import os
import sys
import urllib.error

from guided_diffusion.fetch import asset_checks
from guided_diffusion.common import assets
from guided_diffusion.fetch.download import DownloadError, discard_part, download_part, part_path, remote_size
from guided_diffusion.common.errors import REPO_ROOT, OneLineErrorParser
from guided_diffusion.run.flag_files import CONFIG_DIR, available_configs, config_flags, config_path, resolve_config
from guided_diffusion.tables.table_rows import ReproduceError, is_row_metadata, read_metadata

# --ag_model_path: autoguidance's guide checkpoint (rows that autoguide).
CHECKPOINT_FLAGS = ("model_path", "classifier_path", "ag_model_path")


class FetchUsageError(Exception):
    """A NAME that is neither a file, a group nor a config."""


def create_argparser():
    parser = OneLineErrorParser(
        usage="%(prog)s [options] NAME [NAME ...]\n       %(prog)s --list [--dest DIR] [--remote_sizes]",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME",
        help="file names, groups or configs to fetch (see above; --list shows every file and group)",
    )
    where = parser.add_argument_group("where files go")
    where.add_argument(
        "--dest", metavar="DIR",
        help="put every file in DIR instead of its default place (checkpoints and LPIPS weights: the "
        "repository's models/, reference batches: its datasets/, Inception and DINOv2 weights: torch's hub checkpoint folder or $"
        f"{assets.INCEPTION_PATH_ENV} / ${assets.DINOV2_PATH_ENV}); pass DIR to the scripts too (reproduce.py "
        "--model_dir DIR, --ref_batch, --inception_path, evaluator.py --dinov2_path)",
    )
    where.add_argument(
        "--force", action="store_true",
        help="replace a file already in place that fails verification (without it, such a file is reported and "
        "left alone)",
    )
    source = parser.add_argument_group("where files come from")
    source.add_argument(
        "--base_url", metavar="URL",
        help=f"fetch URL/NAME for every file instead of its published URL (a mirror; default ${assets.BASE_URL_ENV} "
        "when set)",
    )
    source.add_argument("--attempts", type=int, default=3, metavar="N", help="connection attempts per file before giving up (default 3)")
    source.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="seconds without data before a connection counts as dropped (default 60)")
    source.add_argument("--retry_wait", type=float, default=2.0, help=argparse.SUPPRESS)
    listing = parser.add_argument_group("listing")
    listing.add_argument(
        "--list", action="store_true",
        help="list every known file (size, status, destination, source) and the groups, then exit; downloads nothing",
    )
    listing.add_argument(
        "--remote_sizes", action="store_true",
        help="with --list: ask each server for the size of the files not present (one HEAD request each)",
    )
    return parser


# --- what the names mean -----------------------------------------------------------------------------------------


def _is_glob(name):
    return any(ch in name for ch in "*?[")


def _config_path(name, config_dir):
    if name.endswith(".cfg") or os.sep in name or name in available_configs(config_dir):
        try:
            return resolve_config(name, config_dir)
        except ValueError:
            return None
    return None


def config_needs(path):
    """
    The files a flag file needs: [(file name, path as the config gives it, what for)]: its checkpoints, and for a
    table row also its reference batch and its feature network's weights, as reproduce.py looks them up.
    """
    try:
        meta = read_metadata(path)
        flags = config_flags(path)
    except (ReproduceError, ValueError) as exc:
        raise FetchUsageError(str(exc)) from None
    needs = []
    for flag in CHECKPOINT_FLAGS:
        if flags.get(flag):
            name = meta.get("model") if flag == "model_path" and meta.get("model") else flags[flag]
            needs.append((os.path.basename(name), flags[flag], f"--{flag}"))
    if meta.get("ref_batch"):
        needs.append((os.path.basename(meta["ref_batch"]), meta["ref_batch"], "reference batch"))
    feature_net = meta.get("feature_net") or ("inception" if is_row_metadata(meta) else "")
    if feature_net == "inception":
        needs.append((assets.INCEPTION, assets.INCEPTION, "feature network"))
    elif feature_net == "dinov2":
        needs.append((assets.DINOV2, assets.DINOV2, "feature network"))
    return needs


def resolve_names(names, config_dir=CONFIG_DIR):
    """
    (assets to fetch, in order and without repeats; notes on files a config needs that no fetch supplies).
    Raises FetchUsageError naming the first NAME that is nothing known.
    """
    table = assets.by_name()
    chosen, notes = [], []

    def add(asset):
        if asset not in chosen:
            chosen.append(asset)

    def add_config(path):
        label = os.path.basename(path)[: -len(".cfg")] if path.endswith(".cfg") else path
        for name, given, why in config_needs(path):
            asset = assets.find(name)
            if asset is not None:
                add(asset)
                continue
            local = given if os.path.isabs(given) else os.path.join(REPO_ROOT, given)
            if os.path.exists(local):
                notes.append(f"{label}: {given} ({why}) is present at {local}; nothing to fetch")
            else:
                notes.append(f"{label}: {given} ({why}) is missing at {local} and is not a released file this "
                             "command knows (see the config's comments)")

    for name in names:
        if name in table:
            add(table[name])
        elif name in assets.GROUPS:
            for member in assets.GROUPS[name]:
                add(table[member])
        elif _is_glob(name):
            matched = fnmatch.filter(available_configs(config_dir), name)
            if not matched:
                raise FetchUsageError(f"no config matches {name!r} (configs are in {config_dir})")
            for config in matched:
                add_config(config_path(config, config_dir))
        else:
            path = _config_path(name, config_dir)
            if path is None:
                known = [*table, *assets.GROUPS, *available_configs(config_dir)]
                raise FetchUsageError(
                    f"unknown NAME {name!r}: not a file, group or config{assets.suggest(name, known)} "
                    f"(--list shows every file and group)"
                )
            add_config(path)
    return chosen, notes


# --- fetching ----------------------------------------------------------------------------------------------------


def _progress(name):
    from tqdm import tqdm

    def bar(total, initial):
        return tqdm(
            total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
            file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
        )

    return bar


def log_line(message):
    print(message, flush=True)  # in order with the progress bars and errors on stderr


def fetch_one(asset, opts, log=log_line):
    """
    Put a verified copy of `asset` at its destination. :return: None on success, else the one-line reason.
    """
    path = assets.destination(asset, opts.dest)
    if os.path.isdir(path):
        return f"{asset.name}: {path} is a folder; move it away or pass --dest DIR"
    if os.path.isfile(path):
        try:
            checked = asset_checks.verify(asset, path)
        except asset_checks.VerificationError as exc:
            if not opts.force:
                return (f"{asset.name}: the file at {path} is not the released one ({exc}); move it away, or pass "
                        "--force to download it again over it")
            log(f"{asset.name}: {path} is not the released file ({exc}); downloading it again")
        else:
            log(f"{asset.name}: present at {path} and verified ({checked}); skipped")
            return None
    url = assets.url_for(asset, opts.base_url)
    if not url:
        return (f"{asset.name} is not at {path}. {asset.manual}, put it there (or in --dest DIR), then run this "
                "command again to check it")
    log(f"{asset.name}: downloading {url}\n  to {path}")
    try:
        part = download_part(
            url, path, progress=_progress(asset.name), attempts=max(1, opts.attempts), retry_wait=opts.retry_wait,
            timeout=opts.timeout, log=log,
        )
    except DownloadError as exc:
        return f"{asset.name}: {exc}"
    except OSError as exc:  # the destination cannot be written (permissions, a full disk)
        return f"{asset.name}: cannot write {part_path(path)}: {exc.strerror or exc}"
    try:
        checked = asset_checks.verify(asset, part)
    except asset_checks.VerificationError as exc:
        discard_part(path)
        return (f"{asset.name}: the file downloaded from {url} is not the released one ({exc}); it was deleted and "
                f"nothing was put at {path}")
    os.replace(part, path)
    discard_part(path)
    log(f"{asset.name}: verified ({checked}); saved at {path}")
    return None


# --- listing -----------------------------------------------------------------------------------------------------


def human_size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def list_assets(opts, out=print):
    rows = []
    for asset in assets.ASSETS:
        path = assets.destination(asset, opts.dest)
        size = None
        if os.path.isfile(path):
            status, size = "present", os.path.getsize(path)
        elif os.path.isfile(part_path(path)):
            status = f"partial ({human_size(os.path.getsize(part_path(path)))})"
        else:
            status = "missing"
        url = assets.url_for(asset, opts.base_url)
        if size is None and opts.remote_sizes and url:
            try:
                size = remote_size(url, timeout=opts.timeout)
            except urllib.error.HTTPError as exc:
                status += f", size unknown (HTTP {exc.code})"
            except Exception as exc:  # a listing goes on past one unreachable server
                status += f", size unknown ({type(exc).__name__})"
        if not url:
            status += ", manual download"
        rows.append((asset.name, human_size(size), status, path))
    widths = [max(len(r[i]) for r in rows + [("NAME", "SIZE", "STATUS", "")]) for i in range(3)]
    out(f"{'NAME':<{widths[0]}}  {'SIZE':>{widths[1]}}  {'STATUS':<{widths[2]}}  DESTINATION")
    for name, size, status, path in rows:
        out(f"{name:<{widths[0]}}  {size:>{widths[1]}}  {status:<{widths[2]}}  {path}")
    if not opts.remote_sizes:
        out("(SIZE is known once a file is present; --remote_sizes asks the servers)")
    out("")
    out("Sources (the URLs as each project publishes them):")
    sources = {}
    for asset in assets.ASSETS:
        sources.setdefault(asset.source, []).append(asset.name)
    for source, names in sources.items():
        out(f"  {source}: {', '.join(names)}")
    out("")
    out("Groups:")
    for group, members in assets.GROUPS.items():
        out(f"  {group}: {', '.join(members)}")
    out("A config name (e.g. adm256_uncond_ddpm250_pag, or a quoted glob 'adm256_*') fetches what that row needs.")


def main(argv=None, config_dir=CONFIG_DIR):
    parser = create_argparser()
    opts = parser.parse_args(argv)
    if opts.list:
        if opts.names:
            parser.error("--list takes no NAME")
        list_assets(opts)
        return 0
    if not opts.names:
        parser.error("give at least one NAME, or --list to see them")
    if opts.remote_sizes:
        parser.error("--remote_sizes goes with --list")
    try:
        chosen, notes = resolve_names(opts.names, config_dir)
    except FetchUsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    for note in notes:
        log_line(f"note: {note}")
    failures = []
    for asset in chosen:
        reason = fetch_one(asset, opts)
        if reason:
            failures.append(reason)
            print(f"{parser.prog}: error: {reason}", file=sys.stderr, flush=True)
    if failures:
        if len(chosen) > 1:
            print(f"{parser.prog}: {len(failures)} of {len(chosen)} files could not be fetched (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; the same command resumes the download", file=sys.stderr)
        sys.exit(130)
