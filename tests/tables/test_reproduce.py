"""
scripts/reproduce.py end to end on a tiny random-weight U-Net and a tiny feature network given as file.py:factory,
and the shipped table-row configs (configs/adm256/adm256_*, configs/digits16/digits16_*).

The sampler runs as a subprocess (as reproduce.py always runs it); reproduce.py itself runs in this process.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch as th

from guided_diffusion.methods import pag
from guided_diffusion.tables import row_runner, sampler_launch
from guided_diffusion.run import run_store
from guided_diffusion.run.flag_files import available_configs, expand_flag_files, resolve_config
from guided_diffusion.tables.results_table import render_table
from guided_diffusion.run.sampler_flags import image_sample_argparser
from guided_diffusion.tables.sampler_launch import launch_settings, run_streaming, sampler_command, sampler_env
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults
from guided_diffusion.tables.table_rows import (
    ReproduceError,
    load_row,
    parse_published,
    read_metadata,
    select_configs,
    steps_label,
)

from conftest import REPO_ROOT, load_script

TINY = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="8,4",
    learn_sigma=True,
    diffusion_steps=50,
    timestep_respacing="5",
)

TINY_NET = '''
import torch
import torch.nn.functional as F
from evaluations.feature_nets import FeatureNet


class TinyNet(FeatureNet):
    name = "tiny-reproduce-net"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, 10, generator=g))
        self.register_buffer("head", torch.randn(10, 5, generator=g))

    def forward(self, images):
        x = F.adaptive_avg_pool2d(images.permute(0, 3, 1, 2), 4).flatten(1) / 255
        return torch.tanh(x @ self.proj * 3), x[:, :6]

    def logits(self, pool):
        return pool @ self.head * 4


def build():
    return TinyNet()
'''

ADM_ROWS = [
    f"adm256_{kind}_{sampler}_{guide}"
    for kind in ("uncond", "cond")
    for sampler in ("ddpm250", "ddim25")
    for guide in ("baseline", "pag")
]


@pytest.fixture(scope="module")
def reproduce():
    return load_script("reproduce")


@pytest.fixture(scope="module")
def image_sample_parser():
    return image_sample_argparser


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """
    A tiny model, a reference batch, a feature network and a config folder: two rows (the second with published
    figures), a shared base that is not a row, and a row whose reference batch is missing.
    """
    root = tmp_path_factory.mktemp("repro")
    th.manual_seed(0)
    args = model_and_diffusion_defaults()
    args.update(TINY)
    model, _ = create_model_and_diffusion(**args)
    gen = th.Generator().manual_seed(0)
    with th.no_grad():
        for p in model.parameters():
            if not p.any():  # ADM zero-initialises output layers; random ones make samples (and PAG) nontrivial
                p.copy_(th.randn(p.shape, generator=gen) * 0.05)
    th.save(model.state_dict(), root / "tiny.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "ref.npz", rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    (root / "tiny_net.py").write_text(TINY_NET)

    cfg = root / "configs"
    cfg.mkdir()
    flags = " ".join(f"--{k} {v}" for k, v in TINY.items())
    (cfg / "tiny_base.cfg").write_text(
        "# script: image_sample.py\n# shared flags, not a row\n"
        f"{flags}\n--model_path {root / 'tiny.pt'} --num_samples 8 --batch_size 4 --seed 3\n"
    )
    header = (
        "# script: image_sample.py\n# title: {title}\n# model: tiny.pt\n"
        f"# ref_batch: {root / 'ref.npz'}\n# feature_net: {root / 'tiny_net.py'}:build\n"
    )
    (cfg / "tiny_plain.cfg").write_text(header.format(title="tiny, no guidance") + f"@{cfg / 'tiny_base.cfg'}\n")
    (cfg / "tiny_pag.cfg").write_text(
        header.format(title="tiny, PAG")
        + "# published: FID=12.5, IS=3.25, Recall=0.5\n# source: Table 9 of a made-up paper\n"
        + f"@{cfg / 'tiny_base.cfg'}\n--pag_scale 2.0 --pag_layers middle_block.1\n"
    )
    (cfg / "tiny_noref.cfg").write_text(
        (header.format(title="tiny, missing reference")).replace(str(root / "ref.npz"), str(root / "absent_ref.npz"))
        + f"@{cfg / 'tiny_base.cfg'}\n"
    )
    return root


def run(reproduce, world, *argv):
    """
    reproduce.main(argv) with the test world's config folder, on the CPU. :return: (exit status, stdout, stderr);
    the sampler's output passes through reproduce.py's stdout.
    """
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = reproduce.main(["--config_dir", str(world / "configs"), "--device", "cpu", *argv])
        except SystemExit as exc:
            status = exc.code
    return status, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()


def _quiet_env(mp, cache_dir):
    mp.setenv("OMP_NUM_THREADS", "1")  # the sampler subprocess shares two cores with everything else
    mp.setenv("PAG_ADM_CACHE_DIR", str(cache_dir))
    mp.setenv("PAG_ADM_DIGEST_DIR", str(cache_dir) + "-digests")
    mp.delenv(run_store.STOP_AFTER_ENV, raising=False)


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, tmp_path):
    _quiet_env(monkeypatch, tmp_path / "activations")


@pytest.fixture(scope="module")
def first_run(reproduce, world):
    results = world / "results"
    with pytest.MonkeyPatch.context() as mp:
        _quiet_env(mp, world / "activations")
        status, out, _ = run(reproduce, world, "tiny_plain", "tiny_pag", "--results", str(results))
    return status, results, out


# --- end to end ---------------------------------------------------------------------------------------------


def test_end_to_end_writes_metrics_and_table(first_run, world):
    status, results, log = first_run
    assert status == 0, log
    for name, scale in (("tiny_plain", 0.0), ("tiny_pag", 2.0)):
        record = json.loads((results / name / "metrics.json").read_text())
        assert record["config"] == name and record["num_samples"] == 8
        assert record["flags"]["pag_scale"] == scale and record["flags"]["seed"] == 3
        assert record["flags"]["model_path"] == str(world / "tiny.pt")
        assert record["feature_net"] == f"{world / 'tiny_net.py'}:build"
        assert set(record["metrics"]) == {"inception_score", "fid", "sfid", "precision", "recall", "kid_mean"}
        assert record["kid_unit"] == "unscaled MMD^2, not x1e3"
        assert all(isinstance(v, float) and np.isfinite(v) for v in record["metrics"].values())
        assert record["timing"]["sampling_seconds"] > 0
        with np.load(record["sample_batch"]) as data:
            assert data["arr_0"].shape == (8, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    # PAG changes the samples, so the two rows' metrics differ.
    plain = json.loads((results / "tiny_plain" / "metrics.json").read_text())["metrics"]
    guided = json.loads((results / "tiny_pag" / "metrics.json").read_text())["metrics"]
    assert plain["fid"] != guided["fid"]

    table = (results / "table.md").read_text().splitlines()
    header = table[2]
    assert header.startswith(
        "| Config | Title | Steps | Guidance | N | Evals/sample | s/sample | IS | IS (paper) | FID | FID (paper) |"
    )
    rows = [line for line in table if line.startswith("| `")]
    assert len(rows) == 2
    plain_cells = [c.strip() for c in rows[0].strip("|").split("|")]
    pag_cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert plain_cells[:5] == ["`tiny_plain`", "tiny, no guidance", "DDPM-5", "no guidance", "8"]
    assert pag_cells[:5] == ["`tiny_pag`", "tiny, PAG", "DDPM-5", "PAG: scale 2.0, layers 'middle_block.1'", "8"]
    # Model evaluations per sample: 5 steps, each guided one at PAG's cost in plain calls.
    model, _ = create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY})
    pag_cost = pag.PAGGuidedModel(model, 2.0, "middle_block.1").call_cost(th.tensor([0])).item()
    assert plain_cells[5] == "5.00" and pag_cells[5] == f"{5 * pag_cost:.2f}" and 5 < 5 * pag_cost < 10
    assert float(plain_cells[6]) > 0
    # Ours next to the paper's: IS, IS (paper), FID, FID (paper), sFID, sFID (paper), ...
    assert pag_cells[7:] == [
        f"{guided['inception_score']:.2f}", "3.25", f"{guided['fid']:.2f}", "12.50",
        f"{guided['sfid']:.2f}", "–", f"{guided['precision']:.3f}", "–", f"{guided['recall']:.3f}", "0.500",
        f"{guided['kid_mean']:.4f}", "–",
    ]
    assert plain_cells[8] == "–"
    assert "Published figures: Table 9 of a made-up paper." in table

    entries = json.loads((results / "table.json").read_text())["rows"]
    assert [e["config"] for e in entries] == ["tiny_plain", "tiny_pag"]
    assert entries[1]["published"] == {"fid": 12.5, "inception_score": 3.25, "recall": 0.5}
    assert entries[1]["metrics"] == guided and entries[0]["status"] == "done"


def test_second_run_is_cached(reproduce, first_run, world, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(first_run[1], results)  # a copy, so other tests see the first run's table
    files = [results / n / f for n in ("tiny_plain", "tiny_pag") for f in ("metrics.json", "samples_8x16x16x3.npz")]
    before = [os.stat(f).st_mtime_ns for f in files]
    # Selected by a glob this time, which also skips the base and leaves out tiny_noref.
    status, out, _ = run(reproduce, world, "tiny_p*", "--results", str(results))
    assert status == 0
    assert out.count("  cached: ") == 2
    assert "sampling 8 images" not in out
    assert [os.stat(f).st_mtime_ns for f in files] == before
    entries = json.loads((results / "table.json").read_text())["rows"]
    assert [(e["config"], e["status"]) for e in entries] == [("tiny_pag", "cached"), ("tiny_plain", "cached")]


def test_changed_flags_are_not_cached(reproduce, first_run, world, tmp_path):
    # Another seed gives other samples: resampled and reevaluated, in a copy so other tests keep their files.
    _, results, _ = first_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    old = json.loads((copy / "tiny_plain" / "metrics.json").read_text())
    status, out, _ = run(reproduce, world, "tiny_plain", "--results", str(copy), "--", "--seed", "4")
    assert status == 0, out
    assert "cached" not in out and "sampling 8 images" in out
    new = json.loads((copy / "tiny_plain" / "metrics.json").read_text())
    assert new["flags"]["seed"] == 4 and new["metrics"] != old["metrics"]


def test_interrupted_row_resumes(reproduce, first_run, world, tmp_path, monkeypatch):
    _, results, _ = first_run
    out_dir = tmp_path / "results"
    parts = out_dir / "tiny_pag" / "samples_8x16x16x3_parts"
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    status, out, _ = run(reproduce, world, "tiny_pag", "--results", str(out_dir))
    assert status == 1
    assert f"error: row tiny_pag: sampling stopped early (exit status {run_store.STOP_EXIT_CODE}" in out
    assert sorted(os.listdir(parts)) == ["000000000-000000004.npz", "cost-000000000-000000004.json", "run.json"]
    assert not (out_dir / "tiny_pag" / "metrics.json").exists()

    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    status, out, _ = run(reproduce, world, "tiny_pag", "--results", str(out_dir))
    assert status == 0, out
    assert "(resuming)" in out and "resuming: 4 of 8 samples already in" in out
    assert not parts.exists()
    # The same samples as the uninterrupted run, hence the same metrics.
    with np.load(out_dir / "tiny_pag" / "samples_8x16x16x3.npz") as a, np.load(
        results / "tiny_pag" / "samples_8x16x16x3.npz"
    ) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    resumed_record = json.loads((out_dir / "tiny_pag" / "metrics.json").read_text())
    # The first run's batch kept what it cost: the record covers every sample.
    assert resumed_record["cost"]["samples_counted"] == resumed_record["cost"]["samples_timed"] == 8
    resumed = resumed_record["metrics"]
    assert resumed == json.loads((results / "tiny_pag" / "metrics.json").read_text())["metrics"]


def test_records_name_the_commit_torch_device_and_ranks(first_run):
    _, results, _ = first_run
    record = json.loads((results / "tiny_pag" / "metrics.json").read_text())
    assert record["environment"]["torch"] == th.__version__ and record["environment"]["device"] == "cpu"
    assert "git_commit" in record["environment"]
    sampling = record["sampling_environment"]
    assert sampling["ranks"] == 1 and sampling["device"] == "cpu" and sampling["torch"] == th.__version__
    # The sampler's own record stays beside the samples.
    kept = json.loads((results / "tiny_pag" / "samples_8x16x16x3.json").read_text())
    assert kept["complete"] and kept["seed"] == 3 and kept["flags"]["pag_scale"] == 2.0


def _save_other_weights(path, seed):
    """
    Other weights of the same architecture written over `path`, with its size and modification time kept.
    """
    before = os.stat(path)
    th.manual_seed(seed)
    args = model_and_diffusion_defaults()
    args.update(TINY)
    model, _ = create_model_and_diffusion(**args)
    gen = th.Generator().manual_seed(seed)
    with th.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(th.randn(p.shape, generator=gen) * 0.05)
    other = path.parent / "other"
    other.mkdir()
    th.save(model.state_dict(), other / path.name)  # the same file name: torch.save names its records after it
    path.write_bytes((other / path.name).read_bytes())
    shutil.rmtree(other)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_swapped_checkpoint_is_not_cached(reproduce, world, tmp_path):
    models = tmp_path / "m"
    models.mkdir()
    shutil.copy(world / "tiny.pt", models / "tiny.pt")
    argv = ["tiny_plain", "--results", str(tmp_path / "results"), "--model_dir", str(models)]
    status, out, _ = run(reproduce, world, *argv)
    assert status == 0, out
    before = json.loads((tmp_path / "results" / "tiny_plain" / "metrics.json").read_text())
    _save_other_weights(models / "tiny.pt", 11)
    status, out, _ = run(reproduce, world, *argv)
    assert status == 0, out
    assert "cached" not in out and "sampling 8 images" in out and "resuming" not in out
    assert f"holds samples of other settings (--model_path {models / 'tiny.pt'} holds other content (sha256 " in out
    after = json.loads((tmp_path / "results" / "tiny_plain" / "metrics.json").read_text())
    assert after["metrics"] != before["metrics"]
    digest = hashlib.sha256((models / "tiny.pt").read_bytes()).hexdigest()
    assert after["key"]["sampling"]["flags"]["model_path"]["sha256"] == digest


@pytest.mark.parametrize("what", ["results", "cache"])
def test_unwritable_outputs_are_refused_before_any_row(reproduce, world, tmp_path, monkeypatch, what):
    # /proc takes no new files even for root.
    results = tmp_path / "results"
    if what == "results":
        results = "/proc/pag_adm_results"
        message = "error: --results '/proc/pag_adm_results' cannot be written: cannot create files in '/proc'"
    else:
        monkeypatch.setenv("PAG_ADM_CACHE_DIR", "/proc/pag_adm_cache")
        message = "error: $PAG_ADM_CACHE_DIR '/proc/pag_adm_cache' cannot be written: cannot create files in '/proc'"
    status, out, err = run(reproduce, world, "tiny_plain", "--results", str(results))
    assert status == 2
    assert err.count("\n") == 1 and message in err
    assert "[1/1]" not in out and not (tmp_path / "results").exists()


def test_the_table_holds_every_result_in_the_folder(reproduce, first_run, world, tmp_path):
    _, results, _ = first_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    status, out, _ = run(reproduce, world, "tiny_plain", "--results", str(copy))
    assert status == 0, out
    table = (copy / "table.md").read_text()
    assert "| `tiny_plain` |" in table and "| `tiny_pag` |" in table
    entries = json.loads((copy / "table.json").read_text())["rows"]
    assert [e["config"] for e in entries] == ["tiny_plain", "tiny_pag"]
    assert entries[0]["status"] == "cached" and entries[1]["status"].startswith("earlier run (finished ")
    guided = json.loads((copy / "tiny_pag" / "metrics.json").read_text())["metrics"]
    assert entries[1]["metrics"] == guided and entries[1]["guidance"] == "PAG: scale 2.0, layers 'middle_block.1'"
    # A call that fails keeps the table whole and says what failed.
    status, out, _ = run(reproduce, world, "tiny_noref", "--results", str(copy))
    assert status == 1
    table = (copy / "table.md").read_text()
    assert "| `tiny_plain` |" in table and "| `tiny_pag` |" in table
    assert "- `tiny_noref`: failed: row tiny_noref: reference batch" in table


# --- missing files and bad names --------------------------------------------------------------------------------


def test_missing_reference_batch_with_keep_going(reproduce, first_run, world, tmp_path):
    _, results, _ = first_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    status, out, _ = run(reproduce, world, "tiny_noref", "tiny_plain", "--results", str(copy), "--keep_going")
    assert status == 1
    missing = world / "absent_ref.npz"
    assert f"error: row tiny_noref: reference batch absent_ref.npz not found at {missing}. " in out
    assert "or pass --ref_batch PATH." in out
    assert "  cached: " in out  # the other row still ran
    table = (copy / "table.md").read_text()
    assert "| `tiny_plain` |" in table and "- `tiny_noref`: failed: row tiny_noref: reference batch" in table


def test_missing_model_stops_at_first_error(reproduce, first_run, world, tmp_path):
    _, results, _ = first_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    status, out, _ = run(
        reproduce, world, "tiny_pag", "tiny_plain", "--results", str(copy), "--model_dir", str(tmp_path / "m")
    )
    assert status == 1
    expected = tmp_path / "m" / "tiny.pt"
    assert f"error: row tiny_pag: checkpoint tiny.pt (--model_path) not found at {expected}. " in out
    assert "or pass --model_dir DIR with tiny.pt in DIR." in out
    assert "cached" not in out  # tiny_plain was not attempted
    entries = json.loads((copy / "table.json").read_text())["rows"]
    assert entries[1]["status"] == "not run (stopped at an earlier error)"


def test_all_missing_files_of_a_row_in_one_message(reproduce, world, tmp_path):
    status, out, _ = run(reproduce, world, "tiny_noref", "--results", str(tmp_path), "--model_dir", str(tmp_path))
    assert status == 1
    assert (
        "error: row tiny_noref: 2 problems:\n"
        f"  - checkpoint tiny.pt (--model_path) not found at {tmp_path / 'tiny.pt'}. "
    ) in out
    assert f"\n  - reference batch absent_ref.npz not found at {world / 'absent_ref.npz'}. " in out
    assert "fetch_assets.py tiny_noref` fetches the released files the row needs" in out
    assert "1 of 1 rows failed: tiny_noref (see the errors above)" in out
    assert not (tmp_path / "tiny_noref").exists()  # nothing was sampled


def test_model_dir_finds_the_checkpoint(reproduce, world, tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(world / "tiny.pt", tmp_path / "m" / "tiny.pt")
    copy = tmp_path / "results"
    opts = reproduce.create_argparser().parse_args(["x", "--results", str(copy), "--model_dir", str(tmp_path / "m")])
    row = select_configs(["tiny_plain"], str(world / "configs"))[0]
    command, args, out_dir = sampler_command(row, opts, [])
    assert args.model_path == str(tmp_path / "m" / "tiny.pt")
    assert out_dir == str(copy / "tiny_plain") and command[-2:] == ["--out_dir", out_dir]


def test_sampler_command_with_mpi_and_extra_flags(reproduce, world, tmp_path):
    opts = reproduce.create_argparser().parse_args(["x", "--results", str(tmp_path), "--mpi", "3", "--num_samples", "6"])
    row = select_configs(["tiny_pag"], str(world / "configs"))[0]
    command, args, _ = sampler_command(row, opts, ["--batch_size", "2", "--num_samples", "99"])
    assert command[:5] == ["mpiexec", "-n", "3", sys.executable, os.path.join(REPO_ROOT, "scripts", "image_sample.py")]
    assert command[5] == "@" + row.path
    assert args.batch_size == 2 and args.num_samples == 6  # --num_samples of reproduce.py wins
    with pytest.raises(ReproduceError, match="--out_dir cannot be passed to the sampler"):
        sampler_command(row, opts, ["--out_dir", "elsewhere"])


def test_unknown_config_name(reproduce, world):
    status, _, err = run(reproduce, world, "zzz")
    assert status == 2
    assert "error: unknown config 'zzz'" in err
    assert "table rows in " in err and ": tiny_noref, tiny_pag, tiny_plain" in err
    status, _, err = run(reproduce, world, "tiny_pga")
    assert status == 2 and "unknown config 'tiny_pga'" in err and "did you mean tiny_pag" in err
    # The shipped configs: the close names, not the hundred rows.
    with pytest.raises(ReproduceError) as unknown:
        select_configs(["digits16_layer_midle"])
    assert "did you mean digits16_layer_middle" in str(unknown.value) and "adm256_scale_2p0" not in str(unknown.value)


def test_glob_selects_rows_only(world):
    cfg = str(world / "configs")
    assert [r.name for r in select_configs(["tiny_p*"], cfg)] == ["tiny_pag", "tiny_plain"]
    assert [r.name for r in select_configs(["tiny_*", "tiny_pag"], cfg)] == ["tiny_noref", "tiny_pag", "tiny_plain"]
    with pytest.raises(ReproduceError, match=r"no table row matches 'tiny_b\*'; rows in .*: tiny_noref, tiny_pag"):
        select_configs(["tiny_b*"], cfg)  # only the base matches, and it is not a row
    with pytest.raises(ReproduceError, match="config tiny_base .* is not a table row: it has no '# ref_batch:' line"):
        select_configs(["tiny_base"], cfg)


def test_metadata_and_published_parsing(tmp_path):
    assert parse_published("FID=26.21, sFID=6.35, is=39.70, Precision=0.61, Recall=0.63", "x") == {
        "fid": 26.21, "sfid": 6.35, "inception_score": 39.70, "precision": 0.61, "recall": 0.63
    }
    with pytest.raises(ReproduceError, match=r"x: '# published:' item 'CLIP=3' is not NAME=NUMBER with NAME one of IS"):
        parse_published("FID=1, CLIP=3", "x")
    with pytest.raises(ReproduceError, match=r"value 'abc' of FID is not a number"):
        parse_published("FID=abc", "x")
    path = tmp_path / "r.cfg"
    path.write_text("# script: image_sample.py\n# just prose: not a key\n# ref_batch: a.npz\n--seed 1\n# title: late\n")
    assert read_metadata(path) == {"script": "image_sample.py", "ref_batch": "a.npz"}
    row = load_row(str(path))
    assert row.title == "r" and row.feature_net == "inception" and row.published == {}
    path.write_text("# script: super_res_sample.py\n# ref_batch: a.npz\n")
    with pytest.raises(ReproduceError, match="must name one of image_sample.py, classifier_sample.py"):
        load_row(str(path))


def test_render_table_without_published_has_no_paper_columns():
    entry = dict(config="a", title="t", steps="DDIM-25", guidance="PAG: scale 3.0, layers 'middle'", num_samples=4,
                 metrics=dict(inception_score=1.0, fid=2.0, sfid=None, precision=0.5, recall=0.25, kid_mean=0.125),
                 published=None, source=None, status="done")
    text = render_table([entry])
    assert "(paper)" not in text
    assert "| `a` | t | DDIM-25 | PAG: scale 3.0, layers 'middle' | 4 | 1.00 | 2.00 | – | 0.500 | 0.250 | 0.1250 |" in text
    assert "KID is unscaled MMD^2, not x1e3 (it can be slightly negative when the sets match)." in text


# --- the shipped configs ----------------------------------------------------------------------------------------


def _parse(parser_factory, name):
    tokens, _ = expand_flag_files(["@" + resolve_config(name)])
    args, unknown = parser_factory().parse_known_args(tokens)
    assert unknown == [], f"{name}: {unknown}"
    return args


def test_adm256_rows_carry_the_official_settings(image_sample_parser):
    # The main table's eight rows (the ablation and SAG rows are tested in test_perturbations.py / test_sag.py).
    rows = [r for r in select_configs(["adm256_*"]) if r.name in ADM_ROWS]
    assert sorted(r.name for r in rows) == sorted(ADM_ROWS)
    for row in rows:
        args = _parse(image_sample_parser, row.name)
        cond = "_cond_" in row.name
        assert row.script == "image_sample.py" and row.feature_net == "inception"
        assert row.meta["model"] == ("256x256_diffusion.pt" if cond else "256x256_diffusion_uncond.pt")
        assert args.model_path == "models/" + row.meta["model"]
        assert row.meta["ref_batch"].endswith("VIRTUAL_imagenet256_labeled.npz")
        # ADM's README flags for the 256x256 models.
        assert (args.image_size, args.num_channels, args.num_res_blocks, args.num_head_channels) == (256, 256, 2, 64)
        assert (args.attention_resolutions, args.diffusion_steps, args.noise_schedule) == ("32,16,8", 1000, "linear")
        assert args.learn_sigma and args.resblock_updown and args.use_fp16 and args.use_scale_shift_norm
        assert args.class_cond == cond and args.num_samples == 50000
        ddim = "_ddim25_" in row.name
        assert steps_label(args) == ("DDIM-25" if ddim else "DDPM-250")
        assert args.timestep_respacing == ("ddim25" if ddim else "250") and args.use_ddim == ddim
        if row.name.endswith("_pag"):
            assert args.pag_scale == 3.0 == pag.scale_from_guide_scale(4.0)
            assert args.pag_layers == pag.OFFICIAL_IMAGENET256_LAYERS and args.pag_interval == ""
        else:
            assert args.pag_scale == 0.0


def test_adm256_layers_exist_in_both_models(image_sample_parser):
    # The official layers must be attention blocks of the uncond and the cond 256x256 architecture alike (built on
    # the meta device: only the module tree is needed, not 500M parameters).
    for name in ("adm256_uncond_ddpm250_pag", "adm256_cond_ddim25_pag"):
        args = _parse(image_sample_parser, name)
        with th.device("meta"):
            model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
        assert pag.resolve_layers(model, args.pag_layers) == pag.OFFICIAL_IMAGENET256_LAYERS.split(",")


def test_digits_rows(image_sample_parser):
    rows = select_configs(["digits16_*"])
    names = [r.name for r in rows]
    # The PAG scale and layer-group rows (the SAG, perturbation and single-layer rows are tested in
    # test_perturbations.py / test_sag.py).
    rows = [r for r in rows if r.name == "digits16_baseline" or r.name.startswith("digits16_pag")]
    assert "digits16_model" not in names and "digits16_train" not in names and "digits16_sampling" not in names
    settings = set()
    for row in rows:
        args = _parse(image_sample_parser, row.name)
        assert row.meta["ref_batch"] == "datasets/digits16.npz"
        assert row.feature_net == "evaluations.digits_net:load_digits_net"
        assert args.model_path == "models/digits16.pt" and args.image_size == 16
        assert steps_label(args) == "DDPM-100" and args.clip_denoised
        settings.add((args.pag_scale, args.pag_layers if args.pag_scale else None))
    assert settings == {
        (0.0, None), (1.0, "middle"), (2.0, "middle"), (3.0, "middle"), (5.0, "middle"),
        (3.0, "input"), (3.0, "output"), (3.0, "all"),
    }


def test_every_row_config_is_found_by_name():
    for name in available_configs():
        if name.startswith(("adm256_", "digits16_")) and "ref_batch" in read_metadata(resolve_config(name)):
            assert select_configs([name])[0].name == name


def test_help_shows_the_whole_description_and_the_sampler_flags_form(reproduce):
    text = reproduce.create_argparser().format_help()
    assert "[-- SAMPLER FLAGS ...]" in text.splitlines()[0]
    # The description is whole, not cut after its first line.
    assert "need matplotlib: pip install -e '.[plots]'). See docs/reproduce.md." in text
    assert "python scripts/reproduce.py 'adm256_*' --mpi 8 -- --batch_size 32" in text


def test_ctrl_c_says_how_to_resume(reproduce, monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(reproduce, "main", interrupted)
    assert reproduce.run_command_line([]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_sigterm_takes_the_ctrl_c_way_out(reproduce, monkeypatch, capsys):
    import signal

    def terminated(argv=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(reproduce, "main", terminated)
    assert reproduce.run_command_line([]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interrupted_run_stops_its_sampler(monkeypatch):
    import subprocess

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    class Interrupting(io.BytesIO):
        def write(self, data):
            raise KeyboardInterrupt

    monkeypatch.setattr(sampler_launch.subprocess, "Popen", Recorded)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(Interrupting()))
    with pytest.raises(KeyboardInterrupt):
        run_streaming([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    assert started[0].poll() is not None  # stopped, not left running for 60 s


def test_seeds_give_mean_and_spread(reproduce, world):
    results = world / "results_seeds"
    status, out, _ = run(reproduce, world, "tiny_plain", "--seeds", "0,1,2", "--results", str(results))
    assert status == 0, out
    per_seed = [json.loads((results / "tiny_plain" / f"seed{k}" / "metrics.json").read_text()) for k in range(3)]
    assert [r["flags"]["seed"] for r in per_seed] == [0, 1, 2]
    fids = np.array([r["metrics"]["fid"] for r in per_seed])
    assert len(set(fids.tolist())) == 3  # other seeds, other samples
    entry = json.loads((results / "table.json").read_text())["rows"][0]
    assert entry["seeds"] == [0, 1, 2]
    assert entry["metrics"]["fid"] == pytest.approx(fids.mean())
    assert entry["metrics_std"]["fid"] == pytest.approx(fids.std(ddof=1))
    table = (results / "table.md").read_text()
    assert f"{fids.mean():.2f} ± {fids.std(ddof=1):.2f}" in table
    assert "mean ± sample standard deviation over seeds 0, 1, 2" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "1,1"], "--seeds must be distinct non-negative integers"),
        (["--seeds", "0,1", "--", "--seed", "4"], "--seed after `--` conflicts with --seeds"),
    ],
)
def test_bad_seeds_are_refused(reproduce, world, argv, message):
    status, _, err = run(reproduce, world, "tiny_plain", *argv)
    assert status == 2 and message in err


@pytest.mark.parametrize("flags, prefix", [
    (["--launcher", "torchrun", "--nproc", "2"],
     [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    (["--launcher", "srun", "--nproc", "4"], ["srun", "--ntasks", "4", sys.executable]),
    (["--nproc", "3"], ["mpiexec", "-n", "3", sys.executable]),
    (["--launcher", "mpiexec", "--nproc", "3"], ["mpiexec", "-n", "3", sys.executable]),
    (["--launcher", "none"], [sys.executable]),
    ([], [sys.executable]),
])
def test_sampler_command_launchers(reproduce, world, tmp_path, flags, prefix):
    opts = reproduce.create_argparser().parse_args(["x", "--results", str(tmp_path), *flags])
    row = select_configs(["tiny_pag"], str(world / "configs"))[0]
    command, _, _ = sampler_command(row, opts, [])
    script = os.path.join(REPO_ROOT, "scripts", "image_sample.py")
    assert command[: len(prefix) + 1] == [*prefix, script]


@pytest.mark.parametrize("flags, message", [
    (["--mpi", "2", "--launcher", "torchrun"], "--mpi 2 means --launcher mpiexec --nproc 2; give one or the other"),
    (["--launcher", "torchrun"], "--launcher torchrun needs --nproc N, the number of ranks"),
    (["--launcher", "none", "--nproc", "2"], "--launcher none runs one process; --nproc 2 needs mpiexec"),
    (["--nproc", "0"], "--nproc must be at least 1, got 0"),
])
def test_bad_launcher_flags(reproduce, flags, message):
    opts = reproduce.create_argparser().parse_args(["x", *flags])
    with pytest.raises(ValueError) as info:
        launch_settings(opts)
    assert str(info.value).startswith(message)


def test_shard_is_not_passed_through(reproduce, world, tmp_path):
    opts = reproduce.create_argparser().parse_args(["x", "--results", str(tmp_path)])
    row = select_configs(["tiny_pag"], str(world / "configs"))[0]
    with pytest.raises(ReproduceError, match="--shard cannot be passed through reproduce.py"):
        sampler_command(row, opts, ["--shard", "0/2"])


def test_device_places_the_sampler_too(reproduce, world, monkeypatch, tmp_path):
    # The samplers take a GPU whenever one is visible, so --device cpu must hide them from the sampler process.
    seen = []

    def recording(command, extra_env=None):
        seen.append(extra_env)
        return 1, ["error: stopped by the test"]

    monkeypatch.setattr(row_runner, "run_streaming", recording)
    status, out, _ = run(reproduce, world, "tiny_plain", "--results", str(tmp_path / "results"))
    assert status == 1 and seen == [{"CUDA_VISIBLE_DEVICES": ""}], out
    assert sampler_env("cuda:1", {}) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert sampler_env("cuda:1", {"CUDA_VISIBLE_DEVICES": "4,6"}) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert sampler_env("cuda", {"CUDA_VISIBLE_DEVICES": "4,6"}) == {}
    with pytest.raises(ReproduceError, match="--device 'cuda:2': no such GPU"):
        sampler_env("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})


def test_run_streaming_sets_the_extra_environment(monkeypatch, capsys):
    status, tail = run_streaming(
        [sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"], {"CUDA_VISIBLE_DEVICES": ""}
    )
    assert status == 0 and tail == ["''"]


def test_feature_nets_load_once_per_spec_and_retry_a_failed_load(monkeypatch):
    loads = []

    def loading(spec, device=None, inception_path=None):
        loads.append((spec, device, inception_path))
        if spec == "absent":
            raise FileNotFoundError("no such weights")
        return object()

    monkeypatch.setattr(row_runner, "load_feature_net", loading)
    nets = row_runner.FeatureNets("cpu", "w.pth")
    assert nets.get("a") is nets.get("a") and nets.get("b") is not nets.get("a")
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            nets.get("absent")
    assert loads == [("a", "cpu", "w.pth"), ("b", "cpu", "w.pth"), ("absent", "cpu", "w.pth"), ("absent", "cpu", "w.pth")]
