"""
scripts/image_sample.py and scripts/classifier_sample.py end to end, on tiny random-weight models, and the pieces
of the shared sampling layer they rest on: per-sample random streams (random_streams.py), resumable parts
(run_store.py), the PNG grid (image_output.py) and the guidance flags (guidance.py).

The scripts run in this process through main(argv) where possible (importing torch again per run would dominate
the time) and as subprocesses for the MPI test.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch as th

from conftest import REPO_ROOT, TINY_SAMPLING_FLAGS, flags, load_script, randomize_zero_params, tiny_flags

from guided_diffusion.run import run_store
from guided_diffusion.common.errors import UsageError
from guided_diffusion.run.guidance import PAGFlags, parse_interval
from guided_diffusion.run.image_output import image_bytes, image_grid, to_uint8_images
from guided_diffusion.common.random_streams import PerSampleNoise, sample_generator
from guided_diffusion.respace import space_timesteps
from guided_diffusion.run.run_store import missing_batches
from guided_diffusion.run.sampling_cli import sample_images
from guided_diffusion.script_util import (
    NUM_CLASSES,
    classifier_defaults,
    create_classifier,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)

TINY_CLASSIFIER = dict(classifier_width=64, classifier_depth=1, classifier_attention_resolutions="8")


def _save_model(path, seed, **overrides):
    th.manual_seed(seed)
    args = model_and_diffusion_defaults()
    args.update(TINY_SAMPLING_FLAGS)
    args.update(overrides)
    model, _ = create_model_and_diffusion(**args)
    randomize_zero_params(model, seed)
    th.save(model.state_dict(), path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    # Checkpoint digests are cached per file identity (guided_diffusion/common/file_digest.py); each test gets its own
    # cache folder.
    monkeypatch.setenv("PAG_ADM_DIGEST_DIR", str(tmp_path / "digests"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    out = SimpleNamespace()
    out.uncond = _save_model(folder / "uncond.pt", 1)
    out.cond = _save_model(folder / "cond.pt", 2, class_cond=True)
    out.uncond64 = _save_model(folder / "uncond64.pt", 3, image_size=64)
    th.manual_seed(4)
    classifier_args = classifier_defaults()
    classifier_args.update(image_size=64, **TINY_CLASSIFIER)
    classifier = create_classifier(**classifier_args)
    randomize_zero_params(classifier, 4)
    out.classifier = str(folder / "classifier.pt")
    th.save(classifier.state_dict(), out.classifier)
    return out


@pytest.fixture(scope="module")
def classifier_sample():
    return load_script("classifier_sample")


def run_main(script, argv):
    """
    Run a script's main(argv); return the loaded final npz as a dict of arrays.
    """
    path = script.main(argv)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def expected_labels(seed, count):
    return np.array(
        [int(th.randint(NUM_CLASSES, (), generator=sample_generator(seed, i))) for i in range(count)], dtype=np.int64
    )


def assert_nearly_equal_images(a, b):
    """
    Equal up to kernel rounding: a different batch shape may make the model's kernels round differently, which
    can move a few pixels across a uint8 boundary, never further.
    """
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.002


# --- the diffusion's noise_fn hook ----------------------------------------------------------------------------


class _ToyModel:
    """
    A batch-invariant stand-in for the U-Net (elementwise, so every row's output depends on that row alone).
    """

    def __call__(self, x, t, **kwargs):
        return 0.3 * x + 0.001 * t.float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("use_ddim", [False, True])
def test_noise_fn_default_keeps_adm_draw_order(use_ddim):
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    shape = (2, 3, 4, 4)
    th.manual_seed(7)
    default = loop(_ToyModel(), shape)
    calls = []

    def noise_fn(x):
        calls.append(tuple(x.shape))
        return th.randn_like(x)

    th.manual_seed(7)
    hooked = loop(_ToyModel(), shape, noise_fn=noise_fn)
    # The hook replaces exactly the draws the default makes, one per step, so it sees the same random stream.
    assert th.equal(default, hooked)
    assert calls == [shape] * diffusion.num_timesteps


@pytest.mark.parametrize("use_ddim", [False, True])
def test_sample_depends_only_on_seed_and_index(use_ddim):
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
    args = SimpleNamespace(use_ddim=use_ddim, clip_denoised=True)
    seed, count = 11, 5

    def run(splits):
        parts = []
        for start, end in splits:
            gens = [sample_generator(seed, i) for i in range(start, end)]
            parts.append(sample_images(diffusion, _ToyModel(), args, gens, 4, {}, device=th.device("cpu")))
        return np.concatenate(parts)

    by_two = run([(0, 2), (2, 4), (4, 5)])
    by_three = run([(0, 3), (3, 5)])
    np.testing.assert_array_equal(by_two, by_three)

    # The documented scheme, one sample at a time: x_T first, then one draw per step, all from sample i's generator.
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    for i in range(count):
        gen = sample_generator(seed, i)
        x_T = th.randn((3, 4, 4), generator=gen)[None]
        single = loop(
            _ToyModel(), (1, 3, 4, 4), noise=x_T, noise_fn=lambda x: th.randn((3, 4, 4), generator=gen)[None]
        )
        np.testing.assert_array_equal(to_uint8_images(single)[0], by_two[i])


def test_per_sample_generators_are_distinct_and_reproducible():
    a = th.randn(8, generator=sample_generator(0, 3))
    assert th.equal(a, th.randn(8, generator=sample_generator(0, 3)))
    assert not th.equal(a, th.randn(8, generator=sample_generator(0, 4)))
    assert not th.equal(a, th.randn(8, generator=sample_generator(1, 3)))
    noise = PerSampleNoise([sample_generator(0, 3), sample_generator(0, 4)])
    with pytest.raises(ValueError, match="batch of 3 asked from 2 generators"):
        noise(th.zeros(3, 8))


def test_to_uint8_images_rounds_like_adm():
    sample = th.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    images = to_uint8_images(sample)
    assert images.shape == (1, 1, 6, 3) and images.dtype == np.uint8
    # (x + 1) * 127.5, clamped to [0, 255], truncated.
    np.testing.assert_array_equal(images[0, 0, :, 0], [0, 0, 127, 254, 255, 255])


def test_missing_batches_cuts_each_gap_separately():
    assert missing_batches(7, [], 3) == [(0, 3), (3, 6), (6, 7)]
    assert missing_batches(10, [(0, 2), (4, 6)], 3) == [(2, 4), (6, 9), (9, 10)]
    assert missing_batches(4, [(0, 4)], 2) == []


def _read_image(data, fmt="PNG"):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt
        return np.asarray(image.convert("RGB"))


def test_png_grid_layout():
    images = np.arange(5 * 4 * 6 * 3, dtype=np.int64).reshape(5, 4, 6, 3).astype(np.uint8)
    grid = image_grid(images, padding=2)
    # Five images: three columns, two rows, 2 pixels around each.
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2:6, 2:8], images[0])
    np.testing.assert_array_equal(grid[8:12, 10:16], images[4])
    assert not grid[8:12, 18:24].any()
    np.testing.assert_array_equal(_read_image(image_bytes(grid)), grid)


def test_parse_pag_interval():
    assert parse_interval("", 100, "--pag_interval") is None
    assert parse_interval(" 10 , 20 ", 100, "--pag_interval") == (10, 20)
    assert parse_interval("0,99", 100, "--pag_interval") == (0, 99)
    for bad in ("5", "1,2,3", "a,b", "1.5,3"):
        with pytest.raises(UsageError, match="is malformed"):
            parse_interval(bad, 100, "--pag_interval")
    for bad in ("20,10", "-1,5", "0,100"):
        with pytest.raises(UsageError, match=r"out of range: expected 'lo,hi' with integers 0 <= lo <= hi <= 99"):
            parse_interval(bad, 100, "--pag_interval")


def test_pag_interval_follows_rescaled_timesteps():
    pytest.importorskip("guided_diffusion.methods.pag")
    args = model_and_diffusion_defaults()
    args.update(TINY_SAMPLING_FLAGS, timestep_respacing="")
    model, diffusion = create_model_and_diffusion(**args)
    ns = SimpleNamespace(pag_scale=1.0, pag_layers="middle", pag_interval="10,20", diffusion_steps=100)
    pag_flags = PAGFlags()
    for rescale, expected in ((False, (10, 20)), (True, (100.0, 200.0))):
        # With rescale_timesteps the model is called with t * 1000 / diffusion_steps.
        args = SimpleNamespace(**vars(ns), rescale_timesteps=rescale)
        spec = pag_flags.spec(args)
        pag_flags.check_model(spec, model, diffusion)
        assert spec.t_range == expected


# --- image_sample.py ------------------------------------------------------------------------------------------


def test_image_sample_outputs_and_grid(image_sample, ckpt, tmp_path):
    grid_path = tmp_path / "grid.png"
    out = run_main(
        image_sample,
        tiny_flags(
            model_path=ckpt.cond,
            class_cond=True,
            num_samples=5,
            batch_size=2,
            seed=3,
            out_dir=tmp_path,
            grid=grid_path,
        ),
    )
    assert sorted(out) == ["arr_0", "arr_1"]
    assert out["arr_0"].shape == (5, 32, 32, 3) and out["arr_0"].dtype == np.uint8
    assert out["arr_1"].dtype == np.int64
    # Sample i's label is the first draw of its own generator.
    np.testing.assert_array_equal(out["arr_1"], expected_labels(3, 5))
    assert os.path.exists(tmp_path / "samples_5x32x32x3.npz")
    assert not os.path.exists(tmp_path / "samples_5x32x32x3_parts")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

    grid = _read_image(grid_path.read_bytes())
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[2:34, 2:34], out["arr_0"][0])
    np.testing.assert_array_equal(grid[36:68, 36:68], out["arr_0"][4])


def test_image_sample_unconditional_has_no_labels(image_sample, ckpt, tmp_path):
    out = run_main(image_sample, tiny_flags(model_path=ckpt.uncond, num_samples=3, batch_size=3, out_dir=tmp_path))
    assert sorted(out) == ["arr_0"] and out["arr_0"].shape == (3, 32, 32, 3)


def test_batch_size_does_not_change_samples(image_sample, ckpt, tmp_path):
    common = dict(model_path=ckpt.cond, class_cond=True, num_samples=5, seed=5)
    by_two = run_main(image_sample, tiny_flags(batch_size=2, out_dir=tmp_path / "b2", **common))
    by_three = run_main(image_sample, tiny_flags(batch_size=3, out_dir=tmp_path / "b3", **common))
    np.testing.assert_array_equal(by_two["arr_1"], by_three["arr_1"])
    assert_nearly_equal_images(by_two["arr_0"], by_three["arr_0"])
    other_seed = run_main(image_sample, tiny_flags(batch_size=3, out_dir=tmp_path / "s6", **{**common, "seed": 6}))
    assert not np.array_equal(other_seed["arr_1"], by_three["arr_1"])


def test_ddim_sampling(image_sample, ckpt, tmp_path):
    assert sorted(space_timesteps(100, "ddim5")) == [0, 20, 40, 60, 80]
    common = dict(model_path=ckpt.uncond, num_samples=3, seed=2, use_ddim=True, timestep_respacing="ddim5")
    ddim = run_main(image_sample, tiny_flags(batch_size=3, out_dir=tmp_path / "a", **common))
    ddim_by_two = run_main(image_sample, tiny_flags(batch_size=2, out_dir=tmp_path / "b", **common))
    assert_nearly_equal_images(ddim["arr_0"], ddim_by_two["arr_0"])
    ancestral = run_main(
        image_sample, tiny_flags(batch_size=3, out_dir=tmp_path / "c", **{**common, "use_ddim": False})
    )
    assert np.abs(ancestral["arr_0"].astype(int) - ddim["arr_0"]).mean() > 1


def test_pag_scale_zero_equals_plain_run_and_intervals_act(image_sample, ckpt, tmp_path):
    common = dict(model_path=ckpt.uncond, num_samples=3, batch_size=3, seed=1)
    plain = run_main(image_sample, tiny_flags(out_dir=tmp_path / "plain", **common))
    zero = run_main(
        image_sample, tiny_flags(out_dir=tmp_path / "zero", pag_scale=0.0, pag_layers="all", **common)
    )
    np.testing.assert_array_equal(plain["arr_0"], zero["arr_0"])


    guided = run_main(image_sample, tiny_flags(out_dir=tmp_path / "pag", pag_scale=3.0, **common))
    late = run_main(
        image_sample, tiny_flags(out_dir=tmp_path / "late", pag_scale=3.0, pag_interval="50,99", **common)
    )
    assert np.abs(guided["arr_0"].astype(int) - plain["arr_0"]).mean() > 1
    assert np.abs(late["arr_0"].astype(int) - plain["arr_0"]).mean() > 1
    assert not np.array_equal(late["arr_0"], guided["arr_0"])


def test_interrupted_run_resumes_without_duplicates(image_sample, ckpt, tmp_path, monkeypatch):
    common = dict(model_path=ckpt.cond, class_cond=True, num_samples=5, batch_size=2, seed=9)
    reference = run_main(image_sample, tiny_flags(out_dir=tmp_path / "ref", **common))

    out_dir = tmp_path / "resumed"
    parts = out_dir / "samples_5x32x32x3_parts"
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(tiny_flags(out_dir=out_dir, **common))
    assert stopped.value.code == run_store.STOP_EXIT_CODE
    assert sorted(os.listdir(parts)) == ["000000000-000000002.npz", "run.json"]
    assert not (out_dir / "samples_5x32x32x3.npz").exists()
    # A temporary file a killed run left behind is not a part.
    (parts / ".tmp-12345-000000002-000000004.npz").write_bytes(b"truncated")

    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    resumed = run_main(image_sample, tiny_flags(out_dir=out_dir, **common))
    np.testing.assert_array_equal(resumed["arr_0"], reference["arr_0"])
    np.testing.assert_array_equal(resumed["arr_1"], reference["arr_1"])
    assert not parts.exists()


def test_resume_with_another_batch_size_fills_only_the_gaps(image_sample, ckpt, tmp_path, monkeypatch):
    common = dict(model_path=ckpt.cond, class_cond=True, num_samples=5, seed=9)
    out_dir = tmp_path / "run"
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit):
        image_sample.main(tiny_flags(out_dir=out_dir, batch_size=2, **common))
    first_part = out_dir / "samples_5x32x32x3_parts" / "000000000-000000002.npz"
    with np.load(first_part) as data:
        kept = data["arr_0"].copy()
    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    resumed = run_main(image_sample, tiny_flags(out_dir=out_dir, batch_size=3, **common))
    assert resumed["arr_0"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(resumed["arr_1"], expected_labels(9, 5))
    np.testing.assert_array_equal(resumed["arr_0"][:2], kept)


def test_resume_refuses_other_flags(image_sample, ckpt, tmp_path, monkeypatch, capsys):
    common = dict(model_path=ckpt.uncond, num_samples=4, batch_size=2, out_dir=tmp_path)
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit):
        image_sample.main(tiny_flags(**common))
    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        image_sample.main(tiny_flags(pag_scale=1.5, **common))
    assert refused.value.code == 2
    out, err = capsys.readouterr()
    parts = os.path.join(str(tmp_path), "samples_4x32x32x3_parts")
    assert f"cannot resume: the unfinished run in {parts} was started with different settings" in err
    assert "--pag_scale 0.0 (now 1.5)" in err
    assert f"delete {parts} (or pass --overwrite True) to start over" in err
    # Refused before the model loads.
    assert "loading diffusion model" not in out


def _swap_weights_keeping_size_and_mtime(path, seed):
    """
    Overwrite a checkpoint with other weights of the same architecture (so the same size) and set its modification
    time back: what path, size and mtime cannot tell apart.
    """
    before = os.stat(path)
    other = os.path.join(os.path.dirname(path), "other")
    os.makedirs(other)
    # Saved under the same file name, as torch.save names the archive's records after it.
    data = open(_save_model(os.path.join(other, os.path.basename(path)), seed), "rb").read()
    shutil.rmtree(other)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_resume_after_the_checkpoint_was_swapped_is_refused(image_sample, tmp_path, monkeypatch, capsys):
    model = _save_model(tmp_path / "model.pt", 1)
    common = dict(model_path=model, num_samples=4, batch_size=2, out_dir=tmp_path / "run")
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit):
        image_sample.main(tiny_flags(**common))
    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    _swap_weights_keeping_size_and_mtime(model, 7)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        image_sample.main(tiny_flags(**common))
    assert refused.value.code == 2
    out, err = capsys.readouterr()
    assert f"cannot resume: the unfinished run in {tmp_path / 'run'}" in err
    assert f"--model_path {model} holds other content (sha256 " in err
    assert "loading diffusion model" not in out
    # Nothing of the second model was added to the first one's parts.
    parts = tmp_path / "run" / "samples_4x32x32x3_parts"
    assert sorted(os.listdir(parts)) == ["000000000-000000002.npz", "run.json"]


def test_file_digest_is_cached_per_identity_and_sees_a_swap(tmp_path, monkeypatch):
    from guided_diffusion.common import file_digest

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    calls = []
    real = file_digest.sha256_of
    monkeypatch.setattr(file_digest, "sha256_of", lambda p: calls.append(p) or real(p))
    first = file_digest.file_digest(str(path))
    monkeypatch.setattr(file_digest, "_memo", {})  # another process: only the on-disk cache is left
    assert file_digest.file_digest(str(path)) == first and len(calls) == 1
    before = os.stat(path)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    swapped = file_digest.file_digest(str(path))
    assert swapped != first and len(calls) == 2
    import hashlib

    assert swapped == hashlib.sha256(b"b" * 1000).hexdigest()
    # A folder of inputs (inverse_sample.py's --data_dir) changes its digest with any file's content or name.
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"1")
    (images / "b.png").write_bytes(b"2")
    record = file_digest.file_record(str(images))
    assert record["files"] == 2
    (images / "b.png").write_bytes(b"3")
    assert file_digest.file_record(str(images))["sha256"] != record["sha256"]
    (images / "b.png").write_bytes(b"2")
    assert file_digest.file_record(str(images)) == record
    (images / "b.png").rename(images / "c.png")
    assert file_digest.file_record(str(images))["sha256"] != record["sha256"]


def _error_lines(err):
    return [line for line in err.splitlines() if ": error: " in line]


@pytest.mark.parametrize(
    "where, message",
    [
        ("out_dir", "--out_dir '/proc/pag_adm_run' cannot be written: cannot create files in '/proc'"),
        ("grid", "--grid '/proc/g.png' cannot be written: cannot create files in '/proc'"),
        ("grid_folder", "is a folder, not a file"),
    ],
)
def test_unwritable_outputs_are_refused_before_the_model_loads(image_sample, ckpt, tmp_path, capsys, where, message):
    # /proc takes no new files even for root, so this holds however the tests run.
    values = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=tmp_path / "run")
    if where == "out_dir":
        values["out_dir"] = "/proc/pag_adm_run"
    elif where == "grid":
        values["grid"] = "/proc/g.png"
    else:
        (tmp_path / "g.png").mkdir()
        values["grid"] = tmp_path / "g.png"
    with pytest.raises(SystemExit) as refused:
        image_sample.main(tiny_flags(**values))
    assert refused.value.code == 2
    out, err = capsys.readouterr()
    lines = _error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert "loading diffusion model" not in out and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_grid_that_fails_after_sampling_keeps_the_samples(image_sample, ckpt, tmp_path, monkeypatch, capsys):
    def disk_full(path, images):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_store, "save_grid", disk_full)
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as failed:
        image_sample.main(tiny_flags(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=out_dir, grid="g.png"))
    assert failed.value.code == 2
    lines = _error_lines(capsys.readouterr().err)
    final = out_dir / "samples_2x32x32x3.npz"
    assert len(lines) == 1
    assert f"--grid {out_dir / 'g.png'}: cannot write it (No space left on device); the samples are complete in {final}" in lines[0]
    assert final.exists() and not (out_dir / "samples_2x32x32x3_parts").exists()


def test_unwritable_reason_tries_a_probe_file(tmp_path, monkeypatch):
    import tempfile

    from guided_diffusion.common.atomic_io import unwritable_reason

    assert unwritable_reason(str(tmp_path / "new" / "deeper")) is None
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []
    # What an unprivileged user meets in a read-only folder: creating the probe fails.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    reason = unwritable_reason(str(tmp_path / "out"))
    assert reason == f"{str(tmp_path / 'out')!r} cannot be written: cannot create files in {str(tmp_path)!r} (Permission denied)"


_HOLD_LOCK = """
import sys, time
from guided_diffusion.run.run_store import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_job_on_a_folder_is_refused_and_a_dead_holder_is_taken_over(image_sample, ckpt, tmp_path, capsys):
    import socket

    out_dir = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        common = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=out_dir)
        with pytest.raises(SystemExit) as refused:
            image_sample.main(tiny_flags(**common))
        assert refused.value.code == 2
        out, err = capsys.readouterr()
        lines = _error_lines(err)
        assert len(lines) == 1
        assert f"{out_dir} is in use by another sampling run (pid {holder.pid} on {socket.gethostname()}" in lines[0]
        assert "loading diffusion model" not in out
        assert os.listdir(out_dir) == [run_store.LOCK_NAME]  # the holder's, untouched
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file stays, naming a dead pid, and is taken over.
    assert (out_dir / run_store.LOCK_NAME).exists()
    out = run_main(image_sample, tiny_flags(**common))
    assert out["arr_0"].shape == (2, 32, 32, 3)
    assert not (out_dir / run_store.LOCK_NAME).exists()


def test_run_lock_excludes_a_second_holder(tmp_path):
    first, second = run_store.RunLock(str(tmp_path)), run_store.RunLock(str(tmp_path))
    assert first.acquire() is None
    assert run_store.lock_holder(str(tmp_path)).startswith(f"pid {os.getpid()} on ")
    with pytest.raises(UsageError, match=f"is in use by another sampling run \\(pid {os.getpid()} on "):
        second.acquire()
    first.release()
    assert run_store.lock_holder(str(tmp_path)) is None
    assert second.acquire() is None
    second.release()


def test_a_finished_run_is_kept_recorded_and_not_resampled(image_sample, ckpt, tmp_path, capsys):
    out_dir = tmp_path / "run"
    common = dict(model_path=ckpt.uncond, num_samples=3, batch_size=2, seed=5, out_dir=out_dir, grid="grid.png")
    first = run_main(image_sample, tiny_flags(**common))
    final = out_dir / "samples_3x32x32x3.npz"
    record = json.loads((out_dir / "samples_3x32x32x3.json").read_text())
    assert record["complete"] and record["seed"] == 5 and record["num_samples"] == 3
    assert record["flags"]["batch_size"] == 2 and record["flags"]["model_path"] == ckpt.uncond
    assert record["record"]["flags"]["model_path"]["sha256"] == hashlib.sha256(open(ckpt.uncond, "rb").read()).hexdigest()
    env = record["environment"]
    assert env["torch"] == th.__version__ and env["device"] == "cpu" and env["ranks"] == 1
    assert "git_commit" in env
    stamp = os.stat(final).st_mtime_ns
    capsys.readouterr()

    # The same command again (another batch size is the same run): complete, nothing sampled, exit 0.
    (out_dir / "grid.png").unlink()
    again = image_sample.main(tiny_flags(**{**common, "batch_size": 3}))
    out, _ = capsys.readouterr()
    assert again == str(final) and os.stat(final).st_mtime_ns == stamp
    assert f"{final} is already complete" in out and "loading diffusion model" not in out
    grid = _read_image((out_dir / "grid.png").read_bytes())  # written again from the finished samples
    np.testing.assert_array_equal(grid[2:34, 2:34], first["arr_0"][0])

    # Parts a concurrent job left behind do not block the finished samples.
    stale = out_dir / "samples_3x32x32x3_parts"
    stale.mkdir()
    (stale / "000000000-000000002.npz").write_bytes(b"x")
    assert image_sample.main(tiny_flags(**common)) == str(final)

    # Other settings: refused before loading anything, unless --overwrite.
    with pytest.raises(SystemExit) as refused:
        image_sample.main(tiny_flags(**{**common, "pag_scale": 1.5}))
    assert refused.value.code == 2
    out, err = capsys.readouterr()
    assert f"{final} holds finished samples made with other settings: --pag_scale 0.0 (now 1.5)" in err
    assert "--overwrite True" in err and "loading diffusion model" not in out
    redone = run_main(image_sample, tiny_flags(**{**common, "pag_scale": 1.5, "overwrite": True}))
    assert not np.array_equal(redone["arr_0"], first["arr_0"])
    assert json.loads((out_dir / "samples_3x32x32x3.json").read_text())["flags"]["pag_scale"] == 1.5
    grid = _read_image((out_dir / "grid.png").read_bytes())
    np.testing.assert_array_equal(grid[2:34, 2:34], redone["arr_0"][0])
    assert not stale.exists()


def test_a_folder_finished_by_another_job_meanwhile_is_not_resampled(image_sample, ckpt, tmp_path, monkeypatch, capsys):
    common = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2, seed=1)
    run_main(image_sample, tiny_flags(out_dir=tmp_path / "other", **common))
    real = run_store.acquire_run_lock

    def finished_meanwhile(out_dir, comm, *lock_name):
        # The other job finished this folder after start_run looked and before this one took the lock.
        for name in ("samples_2x32x32x3.npz", "samples_2x32x32x3.json"):
            shutil.copy2(tmp_path / "other" / name, tmp_path / "run" / name)
        return real(out_dir, comm, *lock_name)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(run_store, "acquire_run_lock", finished_meanwhile)
    capsys.readouterr()
    path = image_sample.main(tiny_flags(out_dir=tmp_path / "run", **common))
    assert path == str(tmp_path / "run" / "samples_2x32x32x3.npz")
    assert "is already complete" in capsys.readouterr().out
    assert os.stat(path).st_mtime_ns == os.stat(tmp_path / "other" / "samples_2x32x32x3.npz").st_mtime_ns
    assert not (tmp_path / "run" / "log.txt").exists()


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not installed")
def test_two_mpi_ranks_match_one_process(image_sample, ckpt, tmp_path):
    common = dict(model_path=ckpt.cond, class_cond=True, num_samples=5, batch_size=2, seed=4)
    single = run_main(image_sample, tiny_flags(out_dir=tmp_path / "one", **common))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["GUIDED_DIFFUSION_SHARE_GPUS"] = "1"  # two ranks on a one-GPU host
    env.pop(run_store.STOP_AFTER_ENV, None)
    command = [
        "mpiexec",
        "-n",
        "2",
        sys.executable,
        os.path.join(REPO_ROOT, "scripts", "image_sample.py"),
        *tiny_flags(out_dir=tmp_path / "two", **common),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "two" / "samples_5x32x32x3.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], single["arr_0"])
        np.testing.assert_array_equal(data["arr_1"], single["arr_1"])


BAD_IMAGE_SAMPLE_FLAGS = [
    (dict(pag_layers="middle_block.7"), "--pag_layers 'middle_block.7': unknown attention block 'middle_block.7'"),
    (dict(pag_layers="middle_block.7"), "middle_block.1"),
    (dict(pag_interval="5"), "--pag_interval '5' is malformed: expected 'lo,hi'"),
    (dict(pag_interval="10,100"), "--pag_interval '10,100' is out of range"),
    (dict(pag_scale="inf"), "--pag_scale must be a finite number (0 turns PAG off), got inf"),
    (dict(pag_scale="nan"), "--pag_scale must be a finite number (0 turns PAG off), got nan"),
    (dict(model_path=""), "--model_path is required: pass the diffusion model checkpoint"),
    (dict(model_path="no/such/model.pt"), "--model_path 'no/such/model.pt' (the diffusion model checkpoint, a .pt file): no such file or folder in "),
    (dict(timestep_respacing="ddim60", use_ddim=True), "--timestep_respacing 'ddim60' does not fit --diffusion_steps 100"),
    (dict(timestep_respacing="fast"), "--timestep_respacing 'fast' is malformed"),
    (dict(timestep_respacing="200"), "cannot divide section of 100 steps into 200"),
    (dict(num_samples=0), "--num_samples must be positive, got 0"),
    (dict(batch_size=-2), "--batch_size must be positive, got -2"),
    (dict(class_cond=True), "--class_cond False"),
    (dict(pag_scale=3.0, pag_interval="1,24"), "--pag_interval '1,24' contains none of the 5 timesteps"),
    (dict(grid="grid.xyz"), "--grid 'grid.xyz': cannot tell the image format from .xyz"),
    (dict(model_path="."), "--model_path '.' is a folder, not a file"),
    (dict(pag_scale="three"), "error: argument --pag_scale: invalid float value: 'three'"),
    (dict(pag_perturbation="fuzz"), "argument --pag_perturbation: invalid choice: 'fuzz' (choose from 'identity'"),
    (dict(pag_interval="-10,400"), "--pag_interval '-10,400' is out of range"),
    (dict(num_channels=48), "--num_channels 48 does not fit the architecture: level 0 has 48 channels (48 x 1), "
                            "which GroupNorm cannot split into its 32 groups; choose --num_channels (and --channel_mult)"),
    (dict(num_head_channels=48), "--num_channels 32 and --num_head_channels 48 do not fit: the attention at level 1"),
]


@pytest.mark.parametrize("bad, message", BAD_IMAGE_SAMPLE_FLAGS)
def test_image_sample_rejects_bad_flags(image_sample, ckpt, tmp_path, capsys, bad, message):
    values = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=tmp_path / "run")
    values.update(bad)
    with pytest.raises(SystemExit) as rejected:
        image_sample.main(tiny_flags(**values))
    assert rejected.value.code == 2
    err = capsys.readouterr().err
    assert err.count(": error: ") == 1 and "usage:" not in err and "Traceback" not in err
    assert message in err
    # A run that never sampled leaves no output folder (nor log.txt) behind.
    assert not (tmp_path / "run").exists()


def test_flags_of_a_method_that_is_off_are_reported(image_sample, ckpt, tmp_path, capsys):
    common = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2)
    plain = run_main(image_sample, tiny_flags(out_dir=tmp_path / "plain", **common))
    assert "warning" not in capsys.readouterr().err
    ignored = dict(pag_perturbation="blur", pag_blur_sigma=3, pag_layers="all", sag_interval="0,50")
    out = run_main(image_sample, tiny_flags(out_dir=tmp_path / "off", **common, **ignored))
    err = capsys.readouterr().err
    pag = ("warning: PAG is off (--pag_scale 0), so --pag_layers all --pag_perturbation blur --pag_blur_sigma 3.0 "
           "have no effect; give a nonzero --pag_scale to use them")
    sag = "warning: SAG is off (--sag_scale 0), so --sag_interval 0,50 has no effect; give a nonzero --sag_scale"
    assert pag in err and sag in err
    assert pag in (tmp_path / "off" / "log.txt").read_text()
    np.testing.assert_array_equal(out["arr_0"], plain["arr_0"])  # they did nothing, as the warning says


def test_a_bad_attention_backend_is_refused_before_anything_runs(image_sample, ckpt, tmp_path, capsys, monkeypatch):
    from guided_diffusion.common import attention_backends

    monkeypatch.setattr(attention_backends, "_attention_backend", "flash")
    monkeypatch.setattr(attention_backends, "_attention_backend_source", attention_backends.ATTENTION_BACKEND_ENV)
    with pytest.raises(SystemExit) as rejected:
        image_sample.main(tiny_flags(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=tmp_path / "run"))
    assert rejected.value.code == 2
    captured = capsys.readouterr()
    assert "error: unknown attention backend PAG_ADM_ATTENTION='flash'; use one of auto" in captured.err
    assert "Traceback" not in captured.err and "loading" not in captured.out
    assert not (tmp_path / "run").exists()


def _bad_checkpoints(folder, good):
    data = open(good, "rb").read()
    files = {
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "text.pt": b"not a checkpoint\n",
        "readme.md": open(os.path.join(REPO_ROOT, "README.md"), "rb").read(),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    th.save({"model": th.load(good), "step": 7}, folder / "wrapped.pt")
    return folder


@pytest.mark.parametrize(
    "name, message",
    [
        ("truncated.pt", "is not a readable PyTorch checkpoint"),
        ("empty.pt", "is not a PyTorch checkpoint (the file is empty)"),
        ("text.pt", "is not a PyTorch checkpoint (it is a text file): pass the diffusion model checkpoint"),
        ("readme.md", "is not a PyTorch checkpoint (it is a text file)"),
        ("wrapped.pt", "holds a dict with keys 'model', 'step', not a state dict of the diffusion model; its 'model'"),
    ],
)
def test_unreadable_checkpoints_get_one_line_and_no_output_folder(image_sample, ckpt, tmp_path, capsys, name, message):
    bad = _bad_checkpoints(tmp_path, ckpt.uncond) / name
    with pytest.raises(SystemExit) as rejected:
        image_sample.main(tiny_flags(model_path=bad, num_samples=2, batch_size=2, out_dir=tmp_path / "run"))
    assert rejected.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and str(bad) in error_lines[0] and message in error_lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_refused(image_sample, ckpt, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("")
    for out_dir, message in ((existing, "is an existing file"), (existing / "sub", "lies under the file")):
        with pytest.raises(SystemExit):
            image_sample.main(tiny_flags(model_path=ckpt.uncond, num_samples=2, batch_size=2, out_dir=out_dir))
        assert f"--out_dir {str(out_dir)!r} {message}" in capsys.readouterr().err


def test_grid_format_follows_its_name_and_bare_names_go_in_the_run_folder(image_sample, ckpt, tmp_path, monkeypatch):
    common = dict(model_path=ckpt.uncond, num_samples=2, batch_size=2)
    out = run_main(image_sample, tiny_flags(out_dir=tmp_path / "a", grid=tmp_path / "g.jpg", **common))
    jpeg = (tmp_path / "g.jpg").read_bytes()
    assert jpeg[:3] == b"\xff\xd8\xff"  # a JPEG, not PNG bytes under a .jpg name
    grid = _read_image(jpeg, "JPEG")
    # Lossy, but the first tile is the first sample rather than the second.
    tile = grid[2:34, 2:34].astype(int)
    assert np.abs(tile - out["arr_0"][0]).mean() < np.abs(tile - out["arr_0"][1]).mean()
    # A bare file name lands in the run's own folder, not the working directory.
    monkeypatch.chdir(tmp_path)
    run_main(image_sample, tiny_flags(out_dir=tmp_path / "b", grid="grid.png", **common))
    assert (tmp_path / "b" / "grid.png").exists() and not (tmp_path / "grid.png").exists()
    # Sampling logs no key-value pairs: no always-empty progress.csv beside log.txt.
    assert (tmp_path / "b" / "log.txt").exists() and not (tmp_path / "b" / "progress.csv").exists()
    assert "creating diffusion model and diffusion" in (tmp_path / "b" / "log.txt").read_text()


def test_ctrl_c_says_how_to_resume(image_sample, ckpt, tmp_path, capsys, monkeypatch):
    import tempfile

    from guided_diffusion.run import sampling_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Without --out_dir the run goes to a fresh temporary folder (as in ADM): "rerun the same command" alone would
    # start over in another one, so the message names the folder to pass.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr(sampling_cli, "sample_images", interrupted)
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(tiny_flags(model_path=ckpt.uncond, num_samples=2, batch_size=2))
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("openai-")]
    assert f"interrupted. Finished batches are kept in {folder}: rerun the same command with --out_dir {folder}" in err
    assert "Traceback" not in err
    assert f"rerun with --out_dir {folder}" in (folder / "log.txt").read_text()


# --- classifier_sample.py -------------------------------------------------------------------------------------


def _classifier_flags(ckpt, **extra):
    values = dict(
        TINY_SAMPLING_FLAGS, image_size=64, model_path=ckpt.uncond64, classifier_path=ckpt.classifier, **TINY_CLASSIFIER
    )
    values.update(extra)
    return flags(values)


def test_classifier_sample_with_pag_and_classifier_guidance(classifier_sample, ckpt, tmp_path):
    common = dict(num_samples=2, batch_size=2, seed=2, pag_scale=2.0)
    guided = run_main(
        classifier_sample, _classifier_flags(ckpt, classifier_scale=10.0, out_dir=tmp_path / "cg", **common)
    )
    assert sorted(guided) == ["arr_0", "arr_1"]
    assert guided["arr_0"].shape == (2, 64, 64, 3) and guided["arr_0"].dtype == np.uint8
    # Labels are drawn for the classifier even though the model is unconditional.
    np.testing.assert_array_equal(guided["arr_1"], expected_labels(2, 2))
    unguided = run_main(
        classifier_sample, _classifier_flags(ckpt, classifier_scale=0.0, out_dir=tmp_path / "nocg", **common)
    )
    np.testing.assert_array_equal(unguided["arr_1"], guided["arr_1"])
    assert not np.array_equal(unguided["arr_0"], guided["arr_0"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(classifier_path=""), "--classifier_scale 1.0 needs a classifier: pass its checkpoint with --classifier_path"),
        (dict(classifier_scale="inf"), "--classifier_scale must be a finite number, got inf"),
        (dict(classifier_path="nothing.pt"), "--classifier_path 'nothing.pt' (the classifier checkpoint, a .pt file): no such file"),
    ],
)
def test_classifier_sample_rejects_bad_flags(classifier_sample, ckpt, tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as rejected:
        classifier_sample.main(_classifier_flags(ckpt, num_samples=2, out_dir=tmp_path, **bad))
    assert rejected.value.code == 2
    err = capsys.readouterr().err
    assert ": error: " in err and message in err


def test_checkpoint_mismatch_hints_name_this_scripts_flags(image_sample, classifier_sample, ckpt, tmp_path, capsys):
    def error(script, argv):
        with pytest.raises(SystemExit) as rejected:
            script.main(argv)
        assert rejected.value.code == 2
        err = capsys.readouterr().err
        assert "create_" not in err  # the Python factories are not what a script user can change
        return err

    err = error(image_sample, tiny_flags(image_size=64, model_path=ckpt.classifier, num_samples=2, out_dir=tmp_path))
    assert "this is a classifier checkpoint (it has no output_blocks): it is for scripts/classifier_sample.py's " \
           "--classifier_path" in err
    err = error(classifier_sample, _classifier_flags(ckpt, classifier_num_classes=10, num_samples=2, out_dir=tmp_path))
    assert "Most likely wrong flag: --classifier_num_classes 1000 (the checkpoint predicts 1000 classes)" in err
    assert "--num_channels" not in err
    err = error(classifier_sample, _classifier_flags(ckpt, classifier_path=ckpt.uncond64, num_samples=2, out_dir=tmp_path))
    assert "this is a diffusion-model checkpoint (it has output_blocks): pass it as --model_path" in err


# --- super_res_sample.py --------------------------------------------------------------------------------------

SR_TINY = dict(
    large_size=64,
    small_size=32,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions="16,8",
    diffusion_steps=100,
    timestep_respacing="5",
)


@pytest.fixture(scope="module")
def super_res_sample():
    return load_script("super_res_sample")


@pytest.fixture(scope="module")
def sr_files(tmp_path_factory):
    from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults

    folder = tmp_path_factory.mktemp("sr")
    th.manual_seed(5)
    args = sr_model_and_diffusion_defaults()
    args.update(SR_TINY, class_cond=True)
    model, _ = sr_create_model_and_diffusion(**args)
    randomize_zero_params(model, 5)
    th.save(model.state_dict(), folder / "sr.pt")
    rng = np.random.default_rng(0)
    np.savez(
        folder / "base.npz",
        rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        np.array([1, 500, 999], dtype=np.int64),
    )
    np.savez(folder / "base64.npz", rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    return SimpleNamespace(model=str(folder / "sr.pt"), base=str(folder / "base.npz"), base64=str(folder / "base64.npz"))


def test_super_res_sample_with_pag(super_res_sample, sr_files, tmp_path):
    values = dict(SR_TINY, class_cond=True, model_path=sr_files.model, base_samples=sr_files.base, pag_scale=1.0)
    out = run_main(super_res_sample, flags(dict(values, num_samples=4, batch_size=2, out_dir=tmp_path / "a")))
    assert sorted(out) == ["arr_0"]
    assert out["arr_0"].shape == (4, 64, 64, 3) and out["arr_0"].dtype == np.uint8
    # Resuming and rank splitting rest on the same machinery as image_sample; here: another batch size agrees.
    again = run_main(super_res_sample, flags(dict(values, num_samples=4, batch_size=3, out_dir=tmp_path / "b")))
    assert_nearly_equal_images(out["arr_0"], again["arr_0"])


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(base_samples=""), "--base_samples is required: pass the .npz of low-resolution samples"),
        (dict(base_samples="none.npz"), "--base_samples 'none.npz': no such file"),
        (dict(base_samples="."), "--base_samples '.' is a folder, not a file"),
        ("base64", "arr_0 must hold uint8 images shaped (N, 32, 32, 3) to match --small_size 32"),
    ],
)
def test_super_res_sample_rejects_bad_base_samples(super_res_sample, sr_files, tmp_path, capsys, bad, message):
    if bad == "base64":
        bad = dict(base_samples=sr_files.base64)
    values = dict(SR_TINY, class_cond=True, model_path=sr_files.model, num_samples=2, out_dir=tmp_path, **bad)
    with pytest.raises(SystemExit) as rejected:
        super_res_sample.main(flags(values))
    assert rejected.value.code == 2
    assert message in capsys.readouterr().err


def test_small_images_are_enlarged_for_the_grid():
    from guided_diffusion.run.image_output import enlarge_small

    images = np.arange(2 * 16 * 16 * 3, dtype=np.uint8).reshape(2, 16, 16, 3)
    big = enlarge_small(images)
    assert big.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(big[:, ::4, ::4], images)
    np.testing.assert_array_equal(big[:, 3::4, 3::4], images)
    same = np.zeros((1, 32, 32, 3), np.uint8)
    assert enlarge_small(same) is same


def test_super_res_mismatch_hints_name_only_its_flags(super_res_sample, sr_files, ckpt, tmp_path, capsys):
    values = dict(SR_TINY, class_cond=True, model_path=sr_files.model, base_samples=sr_files.base, num_samples=2,
                  out_dir=tmp_path / "run")
    with pytest.raises(SystemExit):
        super_res_sample.main(flags(dict(values, num_res_blocks=2)))
    err = capsys.readouterr().err
    assert "Most likely wrong flag: --num_res_blocks or --large_size (the checkpoint has" in err
    assert "--channel_mult" not in err and "create_" not in err
    with pytest.raises(SystemExit):
        super_res_sample.main(flags(dict(values, model_path=ckpt.uncond64, class_cond=False)))
    err = capsys.readouterr().err
    assert "the checkpoint is a base model, not an upsampler: sample it with scripts/image_sample.py" in err
    assert not (tmp_path / "run").exists()
