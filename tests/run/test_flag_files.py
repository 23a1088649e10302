"""
Flag files (@configs/NAME): expansion, overriding, and clear errors for typos and unknown configs.
"""

import os

import pytest

from conftest import load_script

from guided_diffusion.run.flag_files import (
    CONFIG_DIR,
    FlagFileArgumentParser,
    available_configs,
    config_flags,
    expand_flag_files,
    resolve_config,
)
from guided_diffusion.script_util import add_dict_to_argparser


def parser():
    p = FlagFileArgumentParser(prog="prog")
    add_dict_to_argparser(p, dict(image_size=64, class_cond=False, pag_layers="middle", pag_scale=0.0))
    return p


def write(path, text):
    path.write_text(text)
    return str(path)


def test_flags_from_file_and_command_line_override(tmp_path):
    cfg = write(tmp_path / "a.cfg", "# a comment\n--image_size 16 --class_cond True  # trailing\n\n--pag_scale 2\n")
    args = parser().parse_args([f"@{cfg}", "--pag_scale", "3.5"])
    assert args.image_size == 16 and args.class_cond is True
    assert args.pag_scale == 3.5  # the command line comes later and wins
    assert args.pag_layers == "middle"


def test_quoted_values_and_nested_files(tmp_path):
    inner = write(tmp_path / "inner.cfg", "--pag_layers 'input_blocks.4.1,middle_block.1'\n")
    outer = write(tmp_path / "outer.cfg", f"@{inner}\n--image_size 32\n")
    args = parser().parse_args([f"@{outer}"])
    assert args.pag_layers == "input_blocks.4.1,middle_block.1"
    assert args.image_size == 32


def test_typo_in_a_config_names_the_file(tmp_path, capsys):
    cfg = write(tmp_path / "bad.cfg", "--image_size 16 --pag_scael 3\n")
    with pytest.raises(SystemExit) as err:
        parser().parse_args([f"@{cfg}"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert f"unrecognized arguments: --pag_scael 3 (from {cfg})" in msg


def test_unknown_config_name_says_did_you_mean_in_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        parser().parse_args(["@digits16_modle"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "usage:" not in msg
    assert "unknown config 'digits16_modle'" in msg and "did you mean digits16_model" in msg
    assert "adm256_scale_2p0" not in msg  # not a list of every config
    with pytest.raises(SystemExit):
        parser().parse_args(["@no_such_config"])
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "unknown config 'no_such_config'" in msg
    assert f"{len(available_configs())} configs are in" in msg


def test_a_bad_value_is_one_line_without_the_usage(capsys):
    with pytest.raises(SystemExit) as err:
        parser().parse_args(["--pag_scale", "three"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg == "prog: error: argument --pag_scale: invalid float value: 'three'\n"


def test_values_that_start_with_a_dash_parse(tmp_path):
    p = FlagFileArgumentParser(prog="prog")
    add_dict_to_argparser(p, dict(pag_interval="", pag_scale=0.0, num_heads_upsample=-1))
    args = p.parse_args(["--pag_interval", "-10,400", "--pag_scale", "-1.5", "--num_heads_upsample", "-1"])
    assert args.pag_interval == "-10,400" and args.pag_scale == -1.5 and args.num_heads_upsample == -1
    cfg = write(tmp_path / "neg.cfg", "--pag_interval -3,4\n")
    assert p.parse_args([f"@{cfg}"]).pag_interval == "-3,4"
    # A flag after a flag is still a flag, not its value.
    with pytest.raises(SystemExit):
        p.parse_args(["--pag_interval", "--pag_scale", "2"])


def test_config_names_resolve_to_the_configs_folder():
    path = resolve_config("digits16_model")
    assert path.endswith(os.path.join("configs", "digits16", "digits16_model.cfg"))
    assert "digits16_model" in available_configs()


def test_self_including_file_is_rejected(tmp_path):
    cfg = tmp_path / "loop.cfg"
    cfg.write_text(f"@{cfg}\n")
    with pytest.raises(ValueError, match="includes itself"):
        expand_flag_files([f"@{cfg}"])


def test_every_shipped_config_parses_with_its_script():
    # Each config names the script it is for in its first line ("# script: NAME"); all flags must exist there.
    for name in available_configs():
        path = resolve_config(name)
        first = open(path).readline()
        script = first.split("script:", 1)[1].split()[0] if "script:" in first else "image_sample.py"
        p = load_script(os.path.join("scripts", script)).create_argparser()
        tokens, _ = expand_flag_files(["@" + path])
        args, unknown = p.parse_known_args(tokens)
        assert unknown == [], f"{name}: flags unknown to {script}: {unknown}"


def test_config_flags_reads_values():
    flags = config_flags(resolve_config("digits16_model"))
    assert flags["image_size"] == "16" and flags["learn_sigma"] == "True"


def test_configs_sit_in_one_folder_per_model_and_their_names_are_unique():
    # `@NAME` finds configs/MODEL/NAME.cfg by name alone, which needs each name once across the folders.
    folders = {}
    for root, _, files in os.walk(CONFIG_DIR):
        for name in files:
            if name.endswith(".cfg"):
                folders.setdefault(name, []).append(os.path.relpath(root, CONFIG_DIR))
    assert folders and all(len(where) == 1 for where in folders.values()), folders
    for name, (where,) in folders.items():
        assert where != "." and name.startswith(where), f"configs/{where}/{name}"
    assert resolve_config("adm256_model") == os.path.join(CONFIG_DIR, "adm256", "adm256_model.cfg")
