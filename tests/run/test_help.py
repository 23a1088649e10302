"""
Every script's --help: a help line for every flag, choices for enumerations, typed "off" values, groups; and ADM's
own README command lines still parse to ADM's values.
"""

import argparse
import functools
import os
import shlex

import pytest

from conftest import REPO_ROOT, load_script

from guided_diffusion.common import flag_help
from guided_diffusion.run.flag_files import config_path
from guided_diffusion.script_util import (
    classifier_defaults,
    diffusion_defaults,
    model_and_diffusion_defaults,
    sr_model_and_diffusion_defaults,
)

SCRIPTS = {
    "image_sample": "scripts/image_sample.py",
    "classifier_sample": "scripts/classifier_sample.py",
    "super_res_sample": "scripts/super_res_sample.py",
    "inverse_sample": "scripts/inverse_sample.py",
    "image_train": "scripts/image_train.py",
    "classifier_train": "scripts/classifier_train.py",
    "reproduce": "scripts/reproduce.py",
    "evaluator": "evaluations/evaluator.py",
    "make_reference_batch": "evaluations/make_reference_batch.py",
}
ADM_SCRIPTS = (
    "image_sample", "classifier_sample", "super_res_sample", "inverse_sample", "image_train", "classifier_train"
)


@functools.lru_cache(maxsize=None)
def _create_argparser(name):
    return load_script(SCRIPTS[name]).create_argparser


def _parser(name):
    return _create_argparser(name)()


def _flags(parser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_has_help(name):
    parser = _parser(name)
    missing = [a.dest for a in _flags(parser) if not (a.help or "").strip()]
    assert missing == [], f"{SCRIPTS[name]}: flags without help: {missing}"
    parser.format_help()  # every help string formats (no stray % in the table)


@pytest.mark.parametrize("name", ADM_SCRIPTS)
def test_adm_flags_come_from_the_table_and_are_grouped(name):
    parser = _parser(name)
    for action in _flags(parser):
        assert action.dest in flag_help.FLAGS, f"{action.dest} is not declared in guided_diffusion/common/flag_help.py"
        # The parser's default and choices are the declaration's (as the script uses the flag).
        declared = flag_help.flag_info(action.dest, name)
        assert action.default == declared.default and type(action.default) is type(declared.default), action.dest
        assert action.choices == declared.choices, action.dest
    titles = [group.title for group in parser._action_groups]
    known = [t for t in titles if t in flag_help.GROUP_ORDER]
    assert known == sorted(known, key=flag_help.GROUP_ORDER.index)  # groups in one order in every script
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert groups.get("model_path", flag_help.INPUT) == flag_help.INPUT
    if "pag_scale" in groups:
        assert groups["pag_scale"] == groups["pag_perturbation"] == flag_help.PAG
        assert groups["sag_layer"] == flag_help.SAG
        assert groups["timestep_respacing"] == flag_help.DIFFUSION
        assert groups["num_channels"] == flag_help.MODEL
        assert groups["out_dir"] == flag_help.OUTPUT


def test_image_sample_help_reads_as_a_manual():
    text = _parser("image_sample").format_help()
    assert "{identity,mask,drop,blur,avgpool2d,noise,seg,soft,tpg}" in text
    assert "--pag_seg_sigma" in text and "--pag_soft_alpha" in text and "--pag_soft_heads" in text
    assert "Perturbed-Attention Guidance" in text and "model (U-Net architecture" in text
    assert "(default: 0.0)" in text  # --pag_scale, with its default
    assert "'ddimN'" in text  # what --timestep_respacing takes


def test_image_sample_help_names_the_embedded_default():
    text = " ".join(_parser("image_sample").format_help().split())
    script = load_script(SCRIPTS["image_sample"])
    assert "With no --model_path and no model flags it samples the embedded 16x16 digits model" in text
    assert os.path.relpath(script.EMBEDDED_MODEL, REPO_ROOT) in text
    assert os.path.relpath(config_path(script.EMBEDDED_CONFIG), REPO_ROOT) in text


@pytest.mark.parametrize("name", ["image_train", "classifier_train"])
def test_training_help_says_where_checkpoints_go(name):
    text = " ".join(_parser(name).format_help().split())
    assert "Checkpoints and logs go to the logger's folder" in text and "$OPENAI_LOGDIR" in text
    assert "modelNNNNNN.pt" in text and "optNNNNNN.pt" in text


def test_enumerations_are_choices_and_match_the_code():
    from guided_diffusion.methods.inverse import GRADIENT_THROUGH, MASK_TYPES, OPERATORS
    from guided_diffusion.methods.perturbations import PERTURBATIONS
    from guided_diffusion.methods.schedules import SCHEDULE_KINDS

    assert flag_help.TASKS == tuple(OPERATORS)
    assert flag_help.MASK_TYPES == MASK_TYPES
    assert flag_help.GRADIENT_THROUGH == GRADIENT_THROUGH
    choices = {a.dest: a.choices for name in ("inverse_sample", "classifier_train", "classifier_sample")
               for a in _flags(_parser(name))}
    assert choices["pag_perturbation"] == tuple(PERTURBATIONS)
    assert choices["noise_schedule"] == ("linear", "cosine")
    assert choices["task"] == flag_help.TASKS
    assert choices["classifier_pool"] == flag_help.CLASSIFIER_POOLS
    assert choices["schedule_sampler"] == ("uniform", "loss-second-moment")
    for prefix in ("pag", "sag", "ag"):
        assert choices[f"{prefix}_schedule"] == SCHEDULE_KINDS


def test_enumerated_values_the_code_accepts_are_all_choices():
    # Each classifier pool and schedule sampler the choices offer must build.
    from guided_diffusion.resample import create_named_schedule_sampler
    from guided_diffusion.script_util import create_classifier, create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=100)
    for name in flag_help.SCHEDULE_SAMPLERS:
        create_named_schedule_sampler(name, diffusion)
    for pool in flag_help.CLASSIFIER_POOLS:
        create_classifier(
            16, False, 32, 1, "8", True, True, pool, classifier_channel_mult="1,2", classifier_num_classes=3
        )


def test_off_values_are_typed_none():
    args = _parser("image_sample").parse_args(["--model_path", "m.pt"])
    assert args.pag_drop_rate is None and args.pag_blur_sigma is None and args.pag_noise_scale is None
    args = _parser("image_sample").parse_args(["--pag_perturbation", "blur", "--pag_blur_sigma", "3"])
    assert args.pag_blur_sigma == 3.0 and isinstance(args.pag_blur_sigma, float)
    inverse = _parser("inverse_sample").parse_args(["--intensity", "2.5"])
    assert inverse.intensity == 2.5 and _parser("inverse_sample").parse_args([]).intensity is None


# ADM's defaults dicts as openai/guided-diffusion's script_util.py writes them (with our two classifier flags).
ADM_MODEL_AND_DIFFUSION = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False, use_new_attention_order=False,
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False,
    predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)
ADM_CLASSIFIER_DEFAULTS = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention", classifier_channel_mult="",
    classifier_num_classes=1000,
)


def test_adm_defaults_functions_return_adms_dicts():
    # The defaults now live in flag_help.py's declarations; ADM's functions still return ADM's dicts, in order.
    from guided_diffusion.script_util import classifier_and_diffusion_defaults

    for got, want in (
        (model_and_diffusion_defaults(), ADM_MODEL_AND_DIFFUSION),
        (classifier_defaults(), ADM_CLASSIFIER_DEFAULTS),
        (diffusion_defaults(), {k: v for k, v in ADM_MODEL_AND_DIFFUSION.items() if k in diffusion_defaults()}),
        (classifier_and_diffusion_defaults(), {**ADM_CLASSIFIER_DEFAULTS, **diffusion_defaults()}),
    ):
        assert list(got.items()) == list(want.items())
        assert all(type(got[k]) is type(want[k]) for k in want)
    sr = sr_model_and_diffusion_defaults()
    assert (sr["large_size"], sr["small_size"]) == (256, 64) and "image_size" not in sr


def test_a_flag_is_declared_once():
    # A declared flag is one entry; declaring it again differently is refused.
    from guided_diffusion.common.flag_help import Flag

    flag_help.declare({"pag_scale": flag_help.FLAGS["pag_scale"]})  # the same declaration again: fine
    with pytest.raises(ValueError, match="declared twice"):
        flag_help.declare({"pag_scale": Flag(flag_help.PAG, "another help", default=1.0)})
    assert flag_help.flag_defaults(["batch_size"], "image_train") == {"batch_size": 1}
    assert flag_help.flag_defaults(["batch_size"]) == {"batch_size": 16}


def test_defaults_stay_adms():
    # The table gives help only: parsing nothing gives ADM's defaults dicts back, values and types.
    for name, defaults in (
        ("image_sample", model_and_diffusion_defaults()),
        ("classifier_sample", {**model_and_diffusion_defaults(), **classifier_defaults()}),
        ("super_res_sample", sr_model_and_diffusion_defaults()),
        ("classifier_train", {**classifier_defaults(), **diffusion_defaults()}),
    ):
        args = vars(_parser(name).parse_args([]))
        for key, value in defaults.items():
            assert args[key] == value and type(args[key]) is type(value), (name, key)


# ADM's README (openai/guided-diffusion), with its flag variables expanded; improved-diffusion's for image_train.
ADM_SAMPLE = "--batch_size 4 --num_samples 100 --timestep_respacing 250"
ADM_256 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
    "--use_fp16 True --use_scale_shift_norm True"
)
ADM_64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)
ADM_UPSAMPLE = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256  --small_size 64 "
    "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
ADM_128 = (
    "--attention_resolutions 32,16,8 --class_cond True --image_size 128 --learn_sigma True --num_channels 256 "
    "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)
ADM_CLASSIFIER = (
    "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 --classifier_width 128 "
    "--classifier_pool attention --classifier_resblock_updown True --classifier_use_scale_shift_norm True"
)
ADM_COMMANDS = [
    ("classifier_sample", f"{ADM_256} --classifier_scale 1.0 --classifier_path models/256x256_classifier.pt "
     f"--model_path models/256x256_diffusion.pt {ADM_SAMPLE}"),
    ("classifier_sample", f"{ADM_64} --classifier_scale 1.0 --classifier_path models/64x64_classifier.pt "
     f"--classifier_depth 4 --model_path models/64x64_diffusion.pt {ADM_SAMPLE}"),
    ("image_sample", f"{ADM_256.replace('--class_cond True', '--class_cond False')} --dropout 0.1 "
     f"--model_path models/lsun_bedroom.pt {ADM_SAMPLE}"),
    ("super_res_sample", f"{ADM_UPSAMPLE} --model_path models/64_256_upsampler.pt --base_samples 64_samples.npz "
     f"{ADM_SAMPLE}"),
    ("classifier_sample", f"--model_path /path/to/model.pt --classifier_path path/to/classifier.pt {ADM_128} "
     f"{ADM_CLASSIFIER} --classifier_scale 1.0 --classifier_use_fp16 True --batch_size 4 --num_samples 50000 "
     "--timestep_respacing ddim25 --use_ddim True"),
    ("classifier_train", "--data_dir path/to/imagenet --iterations 300000 --anneal_lr True --batch_size 256 "
     f"--lr 3e-4 --save_interval 10000 --weight_decay 0.05 {ADM_CLASSIFIER}"),
    ("image_train", "--data_dir path/to/images --image_size 64 --num_channels 128 --num_res_blocks 3 "
     "--diffusion_steps 4000 --noise_schedule linear --lr 1e-4 --batch_size 128"),
]


@pytest.mark.parametrize("name, command", ADM_COMMANDS)
def test_adm_readme_commands_parse_to_adms_values(name, command):
    tokens = shlex.split(command)
    args = _parser(name).parse_args(tokens)
    assert all(flag.startswith("--") for flag in tokens[::2])
    for flag, value in dict(zip(tokens[::2], tokens[1::2])).items():
        got = getattr(args, flag[2:])
        if isinstance(got, bool):
            assert got is (value == "True"), flag
        elif isinstance(got, (int, float)):
            assert got == float(value), flag
        else:
            assert got == value, flag


def test_every_add_argument_in_the_scripts_has_help():
    # The scripts not covered above build their parsers inside main(); read them instead of running them.
    import ast
    import glob

    missing = []
    paths = [p for folder in ("scripts", "evaluations") for p in glob.glob(os.path.join(REPO_ROOT, folder, "*.py"))]
    for path in sorted(paths):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                if not any(k.arg == "help" for k in node.keywords):
                    missing.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
    assert missing == []


def test_architecture_errors_name_the_flag():
    from types import SimpleNamespace

    from guided_diffusion.script_util import check_channel_flags, classifier_and_diffusion_defaults, create_classifier

    model = SimpleNamespace(**{**model_and_diffusion_defaults(), "image_size": 32, "channel_mult": "1,2"})
    check_channel_flags(model, model_and_diffusion_defaults().keys())
    model.num_channels = 48
    with pytest.raises(ValueError, match="--num_channels 48 does not fit the architecture: level 0 has 48 channels"):
        check_channel_flags(model, model_and_diffusion_defaults().keys())
    sr = SimpleNamespace(**{**sr_model_and_diffusion_defaults(), "large_size": 64, "num_channels": 40})
    with pytest.raises(ValueError, match=r"choose --num_channels \(the multipliers are fixed by --large_size 64\)"):
        check_channel_flags(sr, sr_model_and_diffusion_defaults().keys())
    classifier = SimpleNamespace(**{**classifier_and_diffusion_defaults(), "image_size": 16, "classifier_width": 32,
                                    "classifier_channel_mult": "1,2"})
    with pytest.raises(ValueError, match="--classifier_attention_resolutions '32,16,8' for 16x16 images"):
        check_channel_flags(classifier, classifier_and_diffusion_defaults().keys())
    with pytest.raises(ValueError, match="--classifier_attention_resolutions '32,16,8' for 16x16 images"):
        create_classifier(**{k: getattr(classifier, k) for k in classifier_defaults()})
