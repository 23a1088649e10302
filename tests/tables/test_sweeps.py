"""
Sweeps (reproduce.py --sweep), equal-compute accounting (GuidedModel.call_cost, the samplers' evaluations and
seconds per sample) and the curves beside table.md.
"""

import json
import os
import sys

import pytest
import torch as th
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion.tables import result_plots
from guided_diffusion.methods.pag import OFFICIAL_IMAGENET256_LAYERS, PAGGuidedModel, _stage_of
from guided_diffusion.methods.sag import SAGGuidedModel
from guided_diffusion.script_util import create_model, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.methods.stage_flops import count_stage_flops
from guided_diffusion.tables.sweeps import check_grid_flags, parse_grid
from guided_diffusion.tables.table_rows import ReproduceError

from conftest import load_script, randomize_zero_params

DIGITS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="8,4",
    num_heads=4, resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True, diffusion_steps=1000,
    noise_schedule="cosine",
)


@pytest.fixture(scope="module")
def digits_model():
    th.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **DIGITS})
    return randomize_zero_params(model.eval(), 0), diffusion


def flops_of(fn):
    with FlopCounterMode(display=False) as counter, th.no_grad():
        fn()
    return counter.get_total_flops()


# --- call_cost --------------------------------------------------------------------------------------------------


def test_pag_call_cost_is_one_plus_the_flop_share_after_the_first_perturbed_stage(digits_model):
    model, _ = digits_model
    guided = PAGGuidedModel(model, 2.0, "middle")
    first = _stage_of(model, guided.layers[0])
    x, t = th.randn(2, 3, 16, 16), th.tensor([10, 900])
    # Counted here on real tensors, independently of stage_flops.py: the whole pass and the shared prefix.
    total = flops_of(lambda: model(x, t))
    prefix = flops_of(lambda: model.run_stages(x, model.embed(t), [], 0, first))
    share = (total - prefix) / total
    assert 0.3 < share < 0.99
    assert guided.call_cost(t).tolist() == pytest.approx([1 + share] * 2, rel=1e-12)
    # The guided call itself does at most that much work (the identity map skips the perturbed rows' attention
    # products), and not much less.
    ratio = flops_of(lambda: guided(x, t)) / total
    assert 1 + share - 0.05 < ratio <= 1 + share + 1e-9


def test_intervals_and_other_paths_change_the_cost(digits_model):
    model, diffusion = digits_model
    t = th.tensor([100, 499, 500, 900])
    share = PAGGuidedModel(model, 2.0, "middle").call_cost(t)[0].item() - 1
    late = PAGGuidedModel(model, 2.0, "middle", t_range=(0, 499))
    assert late.call_cost(t).tolist() == pytest.approx([1 + share, 1 + share, 1.0, 1.0])
    assert late.call_cost(th.tensor(700)).item() == 1.0  # a scalar t: one row
    assert PAGGuidedModel(model, 0.0, "middle").call_cost(t).tolist() == [1.0] * 4
    # Without the shared prefix the perturbed branch is a whole pass.
    assert PAGGuidedModel(model, 2.0, "middle", share_prefix=False).call_cost(t).tolist() == [2.0] * 4
    # SAG runs the model a second time on the degraded input: two full calls where it guides.
    sag = SAGGuidedModel(model, diffusion, 1.0, layer="middle", t_range=(500, 999))
    assert sag.call_cost(t).tolist() == [1.0, 1.0, 2.0, 2.0]


def test_a_schedules_zero_scale_steps_cost_one_plain_call_and_autoguidance_costs_its_ratio(digits_model):
    from guided_diffusion.methods.autoguidance import AutoguidedModel, guide_cost_ratio
    from guided_diffusion.methods.schedules import ScaleSchedule, model_timesteps
    from guided_diffusion.script_util import create_gaussian_diffusion

    model, _ = digits_model
    diffusion = create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", learn_sigma=True, timestep_respacing="10"
    )
    t = model_timesteps(diffusion).long()  # by step index: t[0] is the last step
    share = PAGGuidedModel(model, 2.0, "middle").call_cost(t)[0].item() - 1

    def expected(scales, guided_cost):
        return [1.0 if s == 0 else guided_cost for s in scales.tolist()]

    # linear and cosine end at scale 0 on the last step: that step is a plain call.
    for kind in ("linear", "cosine"):
        schedule = ScaleSchedule(kind, diffusion)
        cost = PAGGuidedModel(model, 2.0, "middle", schedule=schedule).call_cost(t)
        assert cost[0].item() == 1.0
        assert cost.tolist() == pytest.approx(expected(schedule.step_scales(2.0), 1 + share), rel=1e-12)
    # adaptive clamps the scale at 0 on the late steps; a sigma interval leaves the steps outside it unguided.
    adaptive = ScaleSchedule("adaptive", diffusion, adaptive_a=0.004)
    scales = adaptive.step_scales(2.0)
    assert 0 < int((scales == 0).sum()) < len(scales)
    cost = PAGGuidedModel(model, 2.0, "middle", schedule=adaptive).call_cost(t)
    assert cost.tolist() == pytest.approx(expected(scales, 1 + share), rel=1e-12)
    sigma = ScaleSchedule(diffusion=diffusion, sigma_interval=(0.5, 5.0))
    scales = sigma.step_scales(1.0)
    assert 0 < int((scales == 0).sum()) < len(scales)
    sag = SAGGuidedModel(model, diffusion, 1.0, layer="middle", schedule=sigma)
    assert sag.call_cost(t).tolist() == expected(scales, 2.0)

    # Autoguidance: 1 + the guide's FLOP ratio where guided, 1.0 where the schedule or t_range leaves a step plain.
    th.manual_seed(1)
    guide, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **DIGITS, "channel_mult": "1,1,1"})
    ratio = guide_cost_ratio(model, guide.eval())
    assert 0 < ratio < 1
    cosine = ScaleSchedule("cosine", diffusion)
    autoguided = AutoguidedModel(model, guide, 1.0, schedule=cosine)
    assert autoguided.call_cost(t).tolist() == pytest.approx(expected(cosine.step_scales(1.0), 1 + ratio), rel=1e-12)
    late = AutoguidedModel(model, guide, 1.0, t_range=(0, 499), cost_ratio=ratio)
    assert late.call_cost(t).tolist() == pytest.approx([1 + ratio if v <= 499 else 1.0 for v in t.tolist()])
    assert late.call_cost(th.tensor(700)).item() == 1.0  # a scalar t: one row, as the base's
    assert AutoguidedModel(model, guide, 0.0).call_cost(t).tolist() == [1.0] * len(t)


def test_pag_at_the_official_layers_on_adm256_costs_175_plain_calls():
    # ADM's 256x256 class-conditional architecture, built on the meta device: nothing is allocated or computed.
    flags = dict(
        image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True, class_cond=True,
        use_checkpoint=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
        num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
        use_new_attention_order=False,
    )
    with th.device("meta"):
        model = create_model(**flags)
    split = count_stage_flops(model)
    # docs/speed.md: 2.24 TFLOP per image for a plain call (FLOPs count a multiply-add as two).
    assert sum(split["stages"]) + split["embed"] + split["out"] == pytest.approx(2.24e12, rel=0.01)
    cost = PAGGuidedModel(model, 3.0, OFFICIAL_IMAGENET256_LAYERS).call_cost(th.tensor([5]))
    assert cost.item() == pytest.approx(1.75, abs=0.01)


# --- what the samplers record -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory, digits_model):
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    th.save(digits_model[0].state_dict(), path)
    return path


def sample_cost(checkpoint, out_dir, *extra):
    image_sample = load_script("image_sample")
    argv = [f"--{k}={v}" for k, v in DIGITS.items()] + [
        "--model_path", str(checkpoint), "--num_samples", "3", "--batch_size", "2", "--timestep_respacing", "5",
        "--out_dir", str(out_dir), *extra,
    ]
    path = image_sample.main(argv)
    with open(path[: -len(".npz")] + ".json") as f:
        return json.load(f)["cost"]


def test_plain_sampling_costs_its_steps_and_guidance_its_guided_steps(digits_checkpoint, digits_model, tmp_path):
    plain = sample_cost(digits_checkpoint, tmp_path / "plain")
    assert plain["evaluations_per_sample"] == 5.0 and plain["evaluations_min"] == plain["evaluations_max"] == 5.0
    assert plain["samples_counted"] == plain["samples_timed"] == 3 and plain["seconds_per_sample"] > 0
    # Respacing 5 of 1000 steps visits t = 0, 250, 500, 749, 999: the interval 0..499 guides two of them.
    share = PAGGuidedModel(digits_model[0], 2.0, "middle").call_cost(th.tensor([0]))[0].item() - 1
    guided = sample_cost(digits_checkpoint, tmp_path / "pag", "--pag_scale", "2", "--pag_interval", "0,499")
    assert guided["evaluations_per_sample"] == pytest.approx(5 + 2 * share, rel=1e-12)
    full = sample_cost(digits_checkpoint, tmp_path / "pag_all", "--pag_scale", "2")
    assert full["evaluations_per_sample"] == pytest.approx(5 * (1 + share), rel=1e-12)


# --- sweeps ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "items, message",
    [
        (["scale"], "is not KEY=V1,V2"),
        (["scale=1,,2"], "is not KEY=V1,V2"),
        (["seed=0,1"], "use --seeds"),
        (["scale=1", "scale=2"], "given twice"),
        (["scale=1,1"], "repeats a value"),
    ],
)
def test_bad_grids_are_refused(items, message):
    with pytest.raises(ReproduceError, match=message):
        parse_grid(items)


def test_grid_values_with_commas_and_a_key_also_after_the_double_dash():
    assert parse_grid(["timestep_respacing=10,10;20,20", "--pag_scale=1"]) == [
        ("timestep_respacing", ["10,10", "20,20"]), ("pag_scale", ["1"]),
    ]
    with pytest.raises(ReproduceError, match="both set it"):
        check_grid_flags([("pag_scale", ["1"])], ["--pag_scale", "2"])


def run_reproduce(*argv):
    reproduce = load_script("reproduce")
    status = reproduce.main(["--device", "cpu", *argv])
    return status


@pytest.mark.parametrize(
    "argv, message",
    [
        (["digits16_ddim10_pag3", "--sweep", "no_such_flag=1,2"], "unrecognized arguments: --no_such_flag 1"),
        (["digits16_ddim10_pag3", "--sweep", "scale=1", "--", "--pag_scale", "2"], "both set it"),
        (["digits16_ddim10_baseline", "--sweep", "seed=1"], "use --seeds"),
    ],
)
def test_a_bad_sweep_is_one_error_before_any_row(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_reproduce("--results", str(tmp_path / "results"), *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_the_sweeps_scale_is_the_rows_method_and_the_only_one_setting_it(capsys):
    from guided_diffusion.tables.sampler_launch import parse_sampler_flags
    from guided_diffusion.tables.sweeps import expand_rows
    from guided_diffusion.tables.table_rows import select_configs

    pag, sag = select_configs(["digits16_ddim10_pag3", "digits16_ddim10_sag"])
    points = expand_rows([pag, sag], [("scale", ["1", "2"])], parse_sampler_flags)
    assert [p.flags for p in points] == [
        ("--pag_scale", "1"), ("--pag_scale", "2"), ("--sag_scale", "1"), ("--sag_scale", "2"),
    ]
    # The method's scale after `--` as well would leave one of the two unused.
    with pytest.raises(ReproduceError, match="--sweep sag_scale and --sag_scale after `--` both set it"):
        expand_rows([sag], [("scale", ["1"])], parse_sampler_flags, ["--sag_scale", "0.5"])
    rows = select_configs(["digits16_ddim10_baseline"])
    # Unguided, the scale does not apply: the row itself, once.
    (point,) = expand_rows(rows, [("scale", ["1", "2"])], parse_sampler_flags)
    assert point.name == "digits16_ddim10_baseline" and point.flags == () and point.sweep["point"] == {}


def test_a_sweep_of_two_methods_over_three_scales_is_one_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PAG_ADM_CACHE_DIR", str(tmp_path / "cache"))
    results = tmp_path / "results"
    argv = [
        "digits16_ddim10_pag3", "digits16_ddim10_sag", "--sweep", "scale=0,1,3", "--num_samples", "4",
        "--results", str(results), "--", "--batch_size", "4", "--timestep_respacing", "ddim4",
    ]
    assert run_reproduce(*argv) == 0
    names = [f"digits16_ddim10_{m}@scale={s}" for m in ("pag3", "sag") for s in (0, 1, 3)]
    records = {n: json.loads((results / n / "metrics.json").read_text()) for n in names}
    assert records["digits16_ddim10_pag3@scale=3"]["flags"]["pag_scale"] == 3.0
    assert records["digits16_ddim10_sag@scale=1"]["flags"]["sag_scale"] == 1.0
    assert records["digits16_ddim10_sag@scale=1"]["sweep"] == {
        "base": "digits16_ddim10_sag", "point": {"scale": "1"}, "flags": {"sag_scale": "1"},
    }
    # DDIM-4: 4 evaluations unguided, 8 with SAG (two full calls), between with PAG's shared prefix.
    evaluations = {n: r["cost"]["evaluations_per_sample"] for n, r in records.items()}
    assert evaluations["digits16_ddim10_pag3@scale=0"] == evaluations["digits16_ddim10_sag@scale=0"] == 4.0
    assert evaluations["digits16_ddim10_sag@scale=3"] == 8.0
    assert 4.0 < evaluations["digits16_ddim10_pag3@scale=1"] == evaluations["digits16_ddim10_pag3@scale=3"] < 8.0

    table = (results / "table.md").read_text()
    assert "| Evals/sample | s/sample |" in table
    for name in names:
        assert f"`{name}`" in table
    # matplotlib comes with the test extra.
    plots = ["fid_vs_scale", "precision_recall", "fid_vs_evaluations", "fid_vs_seconds"]
    for plot in plots:
        data = (results / f"digits16_{plot}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000

    # The same command again samples and evaluates nothing.
    files = [results / n / "metrics.json" for n in names] + [
        next((results / n).glob("samples_*.npz")) for n in names
    ]
    before = [os.stat(f).st_mtime_ns for f in files]
    capsys.readouterr()
    assert run_reproduce(*argv) == 0
    out = capsys.readouterr().out
    assert out.count("  cached: ") == 6 and "sampling 4 images" not in out
    assert [os.stat(f).st_mtime_ns for f in files] == before


def _entry(base, point, fid, evaluations, scale, model="m.pt"):
    return {
        "config": base + "@" + ",".join(f"{k}={v}" for k, v in point.items()), "kind": "generation",
        "sweep": {"base": base, "point": point, "flags": {}}, "model": model, "scale": scale, "steps": "DDIM-10",
        "num_samples": 8, "seeds": [0, 1], "metrics": {"fid": fid, "precision": 0.5, "recall": 0.5},
        "metrics_std": {"fid": 1.0, "precision": 0.1, "recall": 0.1}, "evaluations_per_sample": evaluations,
        "seconds_per_sample": evaluations / 100, "sampling_devices": ["cpu: x86_64"],
    }


def test_plots_one_set_per_model_and_no_scale_curve_without_a_swept_scale(tmp_path):
    entries = [_entry("pag", {"scale": s}, 10 - float(s), 18.2, float(s)) for s in ("0", "1", "3")]
    entries += [_entry("layers", {"pag_layers": v}, 5.0, 18.0, 3.0, model="other.pt") for v in ("middle", "output")]
    entries.append(dict(_entry("plain", {}, 7.0, 10.0, 0.0), sweep=None))  # not a sweep: not drawn
    (line,) = result_plots.write_plots(str(tmp_path), entries)
    assert sorted(os.listdir(tmp_path)) == [
        "m_fid_vs_evaluations.png", "m_fid_vs_scale.png", "m_fid_vs_seconds.png", "m_precision_recall.png",
        "other_fid_vs_evaluations.png", "other_fid_vs_seconds.png", "other_precision_recall.png",
    ]
    assert line.startswith("wrote 7 plots: ")


def test_without_matplotlib_one_line_says_how_to_install_it(monkeypatch, tmp_path):
    entry = {
        "config": "a@scale=1", "sweep": {"base": "a", "point": {"scale": "1"}, "flags": {"pag_scale": "1"}},
        "metrics": {"fid": 3.0}, "kind": "generation", "scale": 1.0,
    }
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = result_plots.write_plots(str(tmp_path), [entry])
    assert len(lines) == 1 and "pip install matplotlib" in lines[0]
    assert result_plots.write_plots(str(tmp_path), [dict(entry, sweep=None)]) == []  # no sweep, nothing to say
    assert os.listdir(tmp_path) == []
