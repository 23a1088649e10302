"""
A reduced toy table: the real digits rows (embedded model, digit feature network, shipped reference batch),
with few samples and steps, run end to end through scripts/reproduce.py.
"""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_reduced_digits_table(tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "scripts", "reproduce.py"),
        "digits16_baseline", "digits16_pag3_middle",
        "--num_samples", "24", "--results", str(results), "--device", "cpu",
        "--", "--timestep_respacing", "8", "--batch_size", "24",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    metrics = {}
    for name in ("digits16_baseline", "digits16_pag3_middle"):
        with open(results / name / "metrics.json") as f:
            metrics[name] = json.load(f)
    for record in metrics.values():
        values = record["metrics"]
        assert values["fid"] >= 0 and values["sfid"] >= 0
        assert 1.0 <= values["inception_score"] <= 10.0  # ten digit classes bound the score
        assert 0.0 <= values["precision"] <= 1.0 and 0.0 <= values["recall"] <= 1.0
        assert record["num_samples"] == 24
    # PAG changes the samples, hence the figures.
    assert metrics["digits16_baseline"]["metrics"]["fid"] != metrics["digits16_pag3_middle"]["metrics"]["fid"]
    table = (results / "table.md").read_text()
    assert "digits16_baseline" in table and "digits16_pag3_middle" in table


def test_reduced_digits_inverse_table(tmp_path):
    # The digits16_inverse_* rows run through reproduce.py like the generation rows and are scored against the
    # ground truth their sampler saves; run from another folder to check the shipped data is found.
    results = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "scripts", "reproduce.py"),
        "digits16_inverse_box_inpainting", "digits16_inverse_box_inpainting_pag",
        "--num_samples", "6", "--results", str(results), "--device", "cpu",
        "--", "--timestep_respacing", "6", "--batch_size", "6",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = {}
    for name in ("digits16_inverse_box_inpainting", "digits16_inverse_box_inpainting_pag"):
        with open(results / name / "metrics.json") as f:
            record = json.load(f)
        values = record["metrics"]
        assert set(values) == {"psnr", "ssim", "lpips", "fid", "kid_mean"} and values["lpips"] is None
        assert 0 < values["psnr"] < 100 and -1 <= values["ssim"] <= 1 and values["fid"] >= 0
        figures[name] = values["psnr"]
    assert figures["digits16_inverse_box_inpainting"] != figures["digits16_inverse_box_inpainting_pag"]
    table = (results / "table.md").read_text()
    assert "| Config | Title | Steps | Guidance | N | PSNR | SSIM | LPIPS | FID | KID |" in table


def test_reduced_sag_and_perturbation_rows_over_seeds(tmp_path):
    # The new toy families (SAG, a random perturbation kind) through reproduce.py, each over two seeds.
    results = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "scripts", "reproduce.py"),
        "digits16_sag", "digits16_kind_mask", "--seeds", "0,1",
        "--num_samples", "12", "--results", str(results), "--device", "cpu",
        "--", "--timestep_respacing", "5", "--batch_size", "12",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {e["config"]: e for e in json.loads((results / "table.json").read_text())["rows"]}
    assert rows["digits16_sag"]["guidance"].startswith("SAG: scale")
    assert "perturbation mask" in rows["digits16_kind_mask"]["guidance"]
    for entry in rows.values():
        assert entry["seeds"] == [0, 1] and entry["metrics_std"]["fid"] is not None
        fids = [entry["per_seed"][s]["fid"] for s in ("0", "1")]
        assert entry["metrics"]["fid"] == sum(fids) / 2 and fids[0] != fids[1]
