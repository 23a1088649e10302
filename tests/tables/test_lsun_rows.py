"""
The LSUN row configs (configs/lsun_*): ADM's README flags for its LSUN checkpoints, the released files they name,
PAG's unconditional settings, and the autoguidance rows that guide horse with the no-dropout horse model.
"""

import glob
import os

import torch

from guided_diffusion.common import assets
from guided_diffusion.methods import pag
from guided_diffusion.run.flag_files import config_flags, expand_flag_files, resolve_config
from guided_diffusion.run.sampler_flags import image_sample_argparser
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.tables.table_rows import read_metadata, select_configs, steps_label

from conftest import REPO_ROOT, load_script

DATASETS = ("bedroom", "cat", "horse")


def parse(name):
    tokens, _ = expand_flag_files(["@" + resolve_config(name)])
    args, unknown = image_sample_argparser().parse_known_args(tokens)
    assert unknown == [], f"{name}: {unknown}"
    return args


def test_lsun_rows_are_adm_readme_settings():
    rows = select_configs(["lsun_*"])
    expected = {f"lsun_{d}_ddpm{n}_{kind}" for d in DATASETS for n in (1000, 250) for kind in ("baseline", "pag")}
    autoguided = {"lsun_horse_ddpm1000_ag", "lsun_horse_ddpm250_ag"}
    assert {r.name for r in rows} == expected | autoguided | {"lsun_horse_nodropout_ddpm1000_baseline"}
    readme = assets.ARCHITECTURES["lsun"][1]  # the README's MODEL_FLAGS for the LSUN models
    for row in rows:
        args = parse(row.name)
        flags = args_to_dict(args, readme.keys())
        nodropout = "nodropout" in row.name
        assert flags == {**readme, "dropout": 0.0 if nodropout else 0.1}, row.name
        assert args.use_fp16 and args.num_samples == 50000 and args.clip_denoised
        # The checkpoint and reference batch are released files fetch_assets.py knows.
        assert args.model_path == "models/" + row.meta["model"] and assets.find(row.meta["model"]) is not None
        dataset = row.name.split("_")[1]
        assert row.meta["model"] == f"lsun_{dataset}{'_nodropout' if nodropout else ''}.pt"
        assert row.meta["ref_batch"] == f"datasets/VIRTUAL_lsun_{dataset}256.npz"
        assert assets.find(row.meta["ref_batch"]) is not None and row.feature_net == "inception"
        steps = 1000 if "_ddpm1000_" in row.name else 250
        assert steps_label(args) == f"DDPM-{steps}" and args.timestep_respacing == str(steps)
        if row.name.endswith("_pag"):
            assert args.pag_scale == 3.0 == pag.scale_from_guide_scale(4.0)
            assert args.pag_layers == pag.OFFICIAL_IMAGENET256_LAYERS and "our experiment" in row.title
            assert row.published == {}  # the PAG paper has no LSUN figures
        elif row.name.endswith("_ag"):
            assert args.pag_scale == 0.0 and args.ag_scale == 1.0 and "our experiment" in row.title
            assert row.published == {}
        else:
            assert args.pag_scale == 0.0 and args.ag_scale == 0.0
            assert bool(row.published) == (steps == 1000)  # ADM's Table 4 sampled LSUN with 1000 steps


def test_pag_layers_exist_in_the_lsun_architecture():
    args = parse("lsun_bedroom_ddpm250_pag")
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    assert pag.resolve_layers(model, args.pag_layers) == pag.OFFICIAL_IMAGENET256_LAYERS.split(",")


def test_autoguidance_rows_guide_horse_with_the_worse_no_dropout_model():
    # Their figures must be ours, not a paper's.
    paths = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "lsun", "lsun_*_ag.cfg")))
    assert [os.path.basename(p) for p in paths] == ["lsun_horse_ddpm1000_ag.cfg", "lsun_horse_ddpm250_ag.cfg"]
    worse = select_configs(["lsun_horse_nodropout_ddpm1000_baseline"])[0].published["fid"]
    better = select_configs(["lsun_horse_ddpm1000_baseline"])[0].published["fid"]
    assert worse > better
    for path in paths:
        meta = read_metadata(path)
        flags = config_flags(path)
        assert "published" not in meta and "our experiment" in meta["title"]
        assert flags["model_path"] == "models/lsun_horse.pt"
        assert flags["ag_model_path"] == "models/lsun_horse_nodropout.pt" and float(flags["ag_scale"]) > 0
        # The sampler parses the row: the guide's flags are the main model's, no flag is left unknown.
        args = parse(os.path.splitext(os.path.basename(path))[0])
        assert args.ag_model_flags == "" and args.ag_model_path == flags["ag_model_path"]
        # fetch_assets.py fetches the guide with the row.
        fetch = load_script(os.path.join("scripts", "fetch_assets.py"))
        names = [name for name, _, _ in fetch.config_needs(path)]
        assert names[:2] == ["lsun_horse.pt", "lsun_horse_nodropout.pt"]
