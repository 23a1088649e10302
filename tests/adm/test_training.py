"""
TrainLoop, checkpoints and the training scripts, on a tiny U-Net with random weights.
"""

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch as th

pytest.importorskip("guided_diffusion.gaussian_diffusion")
pytest.importorskip("guided_diffusion.resample")

from guided_diffusion import logger, train_util  # noqa: E402
from guided_diffusion.common.atomic_io import torch_save_atomic  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (  # noqa: E402
    TrainLoop,
    find_ema_checkpoint,
    parse_resume_step_from_filename,
)

from conftest import REPO_ROOT  # noqa: E402

TINY_FLAGS = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    class_cond=True,
    diffusion_steps=50,
)


def tiny_model_and_diffusion(seed):
    th.manual_seed(seed)
    return create_model_and_diffusion(**{**model_and_diffusion_defaults(), **TINY_FLAGS})


def fixed_data(batch_size=4, seed=0):
    g = th.Generator().manual_seed(seed)
    x = th.rand(batch_size, 3, 8, 8, generator=g) * 2 - 1
    y = th.arange(batch_size) % 3
    while True:
        yield x, {"y": y}


def make_loop(model, diffusion, **overrides):
    kwargs = dict(
        model=model,
        diffusion=diffusion,
        data=fixed_data(),
        batch_size=4,
        microbatch=-1,
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1000,
        save_interval=1000,
        resume_checkpoint="",
    )
    kwargs.update(overrides)
    return TrainLoop(**kwargs)


def seeded_steps(loop, n, first_seed):
    """Take n steps with the RNGs (timesteps: numpy, noise: torch) seeded per step; returns the logged losses."""
    losses = []
    for i in range(n):
        np.random.seed(first_seed + i)
        th.manual_seed(first_seed + i)
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        loop.step += 1
        losses.append(logger.dumpkvs()["loss"])
    return losses


@pytest.fixture
def logdir(tmp_path):
    previous = logger.Logger.CURRENT
    d = str(tmp_path / "logs")
    logger.configure(dir=d, format_strs=["csv"])
    yield d
    logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


def params_equal(a, b):
    a, b = list(a), list(b)
    return len(a) == len(b) and all(th.equal(x, y) for x, y in zip(a, b))


def test_parse_resume_step_and_find_ema(tmp_path):
    assert parse_resume_step_from_filename("/ckpts/model012345.pt") == 12345
    assert parse_resume_step_from_filename("model000000.pt") == 0
    assert parse_resume_step_from_filename("/ckpts/ema_0.9999_000100.pt") == 0  # not a model file
    assert parse_resume_step_from_filename("/ckpts/modelfinal.pt") == 0
    main = str(tmp_path / "model000100.pt")
    assert find_ema_checkpoint(main, 100, 0.9999) is None
    (tmp_path / "ema_0.9999_000100.pt").write_bytes(b"")
    assert find_ema_checkpoint(main, 100, 0.9999) == str(tmp_path / "ema_0.9999_000100.pt")
    assert find_ema_checkpoint("", 100, 0.9999) is None
    assert train_util.find_resume_checkpoint() is None


def test_ema_rate_parsing_and_bad_input():
    assert train_util.parse_ema_rates("0.9999") == [0.9999]
    assert train_util.parse_ema_rates("0.999,0.9999") == [0.999, 0.9999]
    assert train_util.parse_ema_rates(0.5) == [0.5]
    with pytest.raises(ValueError, match=r"EMA rates must be in \(0, 1\), got 1.5 from '1.5'"):
        train_util.parse_ema_rates("1.5")


def test_losses_finite_and_decreasing(logdir):
    model, diffusion = tiny_model_and_diffusion(seed=0)
    loop = make_loop(model, diffusion, microbatch=2, lr=3e-3)
    x, cond = next(fixed_data())
    t = th.arange(0, 50, 16)  # 0, 16, 32, 48: across the whole chain
    noise = th.randn(x.shape, generator=th.Generator().manual_seed(1))

    def eval_loss():
        with th.no_grad():
            return diffusion.training_losses(model, x, t, model_kwargs=cond, noise=noise)["loss"].mean().item()

    before = eval_loss()
    losses = seeded_steps(loop, 8, first_seed=100)
    after = eval_loss()
    assert all(math.isfinite(v) for v in losses)
    # The output layer starts at zero, so the first loss is E[noise^2] ~ 1; training must cut it clearly.
    assert after < 0.75 * before, (before, after, losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_ema_follows_update_rule(logdir):
    model, diffusion = tiny_model_and_diffusion(seed=0)
    loop = make_loop(model, diffusion, ema_rate="0.5")
    before = [p.detach().clone() for p in model.parameters()]
    seeded_steps(loop, 1, first_seed=0)
    after = [p.detach().clone() for p in model.parameters()]
    assert not params_equal(before, after)
    for ema, b, a in zip(loop.ema_params[0], before, after):
        th.testing.assert_close(ema, 0.5 * b + 0.5 * a, rtol=0, atol=1e-6)


def test_loss_aware_sampler_receives_losses(logdir):
    from guided_diffusion.resample import create_named_schedule_sampler

    model, diffusion = tiny_model_and_diffusion(seed=0)
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    loop = make_loop(model, diffusion, microbatch=2, schedule_sampler=sampler)
    seeded_steps(loop, 2, first_seed=7)
    # Two steps of batch 4: eight (t, loss) pairs recorded, all finite and positive.
    assert sampler._loss_counts.sum() == 8
    recorded = sampler._loss_history[sampler._loss_counts > 0, 0]
    assert np.all(np.isfinite(recorded)) and np.all(recorded > 0)


def test_run_loop_saves_and_resume_restores_everything(logdir):
    model, diffusion = tiny_model_and_diffusion(seed=0)
    loop = make_loop(model, diffusion, save_interval=3, lr_anneal_steps=3, log_interval=1)
    np.random.seed(0)
    th.manual_seed(0)
    loop.run_loop()

    assert loop.step == 3
    # Saved once, after step 3 (the final step is a save step, so no second save).
    assert sorted(os.listdir(logdir)) == [
        "ema_0.99_000003.pt",
        "ema_0.9_000003.pt",
        "model000003.pt",
        "opt000003.pt",
        "progress.csv",
    ]
    with open(os.path.join(logdir, "progress.csv")) as f:
        rows = f.read().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[header.index("step")] for r in rows[1:]] == ["0", "1", "2"]
    assert [r.split(",")[header.index("samples")] for r in rows[1:]] == ["4", "8", "12"]
    # Linear annealing: step k uses lr * (1 - k / 3); the last step used 1e-3 / 3.
    assert loop.opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)

    saved = th.load(os.path.join(logdir, "model000003.pt"))
    assert params_equal(saved.values(), [v for v in model.state_dict().values()])
    saved_ema = th.load(os.path.join(logdir, "ema_0.99_000003.pt"))
    ema_sd = loop.mp_trainer.master_params_to_state_dict(loop.ema_params[1])
    assert params_equal(saved_ema.values(), ema_sd.values())
    assert not params_equal(saved_ema.values(), saved.values())

    # Resume into a differently initialised model.
    model2, diffusion2 = tiny_model_and_diffusion(seed=1)
    assert not params_equal(model2.parameters(), model.parameters())
    resumed = make_loop(
        model2,
        diffusion2,
        resume_checkpoint=os.path.join(logdir, "model000003.pt"),
        lr_anneal_steps=5,
    )
    assert resumed.resume_step == 3 and resumed.step == 0
    assert params_equal(model2.parameters(), model.parameters())
    for rate_idx in range(2):
        assert params_equal(resumed.ema_params[rate_idx], loop.ema_params[rate_idx])
    opt_a, opt_b = loop.opt.state_dict(), resumed.opt.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for k in opt_a["state"]:
        assert opt_a["state"][k]["step"] == opt_b["state"][k]["step"] == 3
        assert th.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
        assert th.equal(opt_a["state"][k]["exp_avg_sq"], opt_b["state"][k]["exp_avg_sq"])

    # Continuing the original run and the resumed one with the same randomness gives the same weights.
    loop.lr_anneal_steps = 5
    seeded_steps(loop, 2, first_seed=50)
    seeded_steps(resumed, 2, first_seed=50)
    assert params_equal(model2.parameters(), model.parameters())
    assert params_equal(resumed.ema_params[0], loop.ema_params[0])

    resumed.save()
    assert os.path.exists(os.path.join(logdir, "model000005.pt"))
    assert not [f for f in os.listdir(logdir) if ".tmp" in f]


def test_resume_from_missing_checkpoint_names_it(logdir):
    model, diffusion = tiny_model_and_diffusion(seed=0)
    missing = os.path.join(logdir, "model000042.pt")
    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: {missing}"):
        make_loop(model, diffusion, resume_checkpoint=missing)


def test_torch_save_atomic_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "model000001.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        torch_save_atomic({"x": Unpicklable()}, path)
    assert os.listdir(tmp_path) == []
    torch_save_atomic({"x": th.ones(2)}, path)
    assert os.listdir(tmp_path) == ["model000001.pt"]
    assert th.equal(th.load(path)["x"], th.ones(2))


# ---------------------------------------------------------------- scripts


def _write_pngs(folder, n=4, size=8):
    Image = pytest.importorskip("PIL.Image")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        arr = rng.randint(0, 256, size=(size, size + 4, 3)).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"c{i % 2}_{i}.png"))


def _run_script(name, args, logdir):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENAI_LOGDIR"] = logdir
    env["OPENAI_LOG_FORMAT"] = "log,csv"
    for var in ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "DIFFUSION_TRAINING_TEST"]:
        env.pop(var, None)
    res = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", name)] + args,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _csv_column(path, key):
    with open(path) as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    idx = rows[0].index(key)
    return [r[idx] for r in rows[1:]]


def test_image_train_script_end_to_end(tmp_path):
    data_dir = str(tmp_path / "data")
    _write_pngs(data_dir)
    logdir = str(tmp_path / "run")
    flags = []
    for k, v in TINY_FLAGS.items():
        flags += [f"--{k}", str(v)]
    _run_script(
        "image_train.py",
        ["--data_dir", data_dir, "--batch_size", "2", "--lr_anneal_steps", "3", "--save_interval", "2",
         "--log_interval", "1"] + flags,
        logdir,
    )
    files = sorted(os.listdir(logdir))
    assert files == [
        "ema_0.9999_000002.pt",
        "ema_0.9999_000003.pt",
        "log.txt",
        "model000002.pt",
        "model000003.pt",
        "opt000002.pt",
        "opt000003.pt",
        "progress.csv",
    ]
    assert _csv_column(os.path.join(logdir, "progress.csv"), "step") == ["0", "1", "2"]
    assert all(math.isfinite(float(v)) for v in _csv_column(os.path.join(logdir, "progress.csv"), "loss"))
    state = th.load(os.path.join(logdir, "model000003.pt"))
    model, _ = tiny_model_and_diffusion(seed=0)
    model.load_state_dict(state, strict=True)


def test_classifier_train_script_end_to_end(tmp_path):
    data_dir = str(tmp_path / "data")
    _write_pngs(data_dir, size=64)
    logdir = str(tmp_path / "run")
    common = ["--data_dir", data_dir, "--val_data_dir", data_dir, "--image_size", "64", "--batch_size", "2",
              "--classifier_width", "32", "--classifier_depth", "1", "--classifier_attention_resolutions", "8",
              "--diffusion_steps", "50", "--save_interval", "2", "--log_interval", "1", "--eval_interval", "1"]
    _run_script("classifier_train.py", common + ["--iterations", "3"], logdir)
    assert sorted(os.listdir(logdir)) == [
        "log.txt", "model000002.pt", "model000003.pt", "opt000002.pt", "opt000003.pt", "progress.csv",
    ]
    csv = os.path.join(logdir, "progress.csv")
    assert _csv_column(csv, "step") == ["0", "1", "2"]
    assert all(math.isfinite(float(v)) for v in _csv_column(csv, "train_loss"))
    assert all(math.isfinite(float(v)) for v in _csv_column(csv, "val_loss"))
    # Top-5 accuracy is never below top-1.
    assert all(float(a) <= float(b) for a, b in zip(_csv_column(csv, "train_acc@1"), _csv_column(csv, "train_acc@5")))

    # Resuming from step 3 and training to 4 adds exactly one step and one checkpoint.
    _run_script(
        "classifier_train.py",
        common + ["--iterations", "4", "--resume_checkpoint", os.path.join(logdir, "model000003.pt")],
        logdir,
    )
    assert "model000004.pt" in os.listdir(logdir) and "opt000004.pt" in os.listdir(logdir)
    assert _csv_column(csv, "step")[-1] == "3"
    opt_state = th.load(os.path.join(logdir, "opt000004.pt"))
    assert {float(s["step"]) for s in opt_state["state"].values()} == {4.0}


def test_digits_classifier_trains_and_guides_the_embedded_model(tmp_path):
    # Classifier guidance end to end on the embedded 16x16 digits model: ADM has no built-in channel_mult for
    # 16 px classifiers nor a label set other than ImageNet's, so both come from flags.
    classifier_flags = ["--image_size", "16", "--classifier_channel_mult", "1,2,2", "--classifier_num_classes", "10",
                        "--classifier_width", "32", "--classifier_depth", "1",
                        "--classifier_attention_resolutions", "8,4", "--diffusion_steps", "1000",
                        "--noise_schedule", "cosine"]
    logdir = str(tmp_path / "classifier")
    _run_script(
        "classifier_train.py",
        ["--data_dir", os.path.join(REPO_ROOT, "datasets", "digits16.npz"), "--batch_size", "4",
         "--iterations", "2", "--save_interval", "2", "--log_interval", "1"] + classifier_flags,
        logdir,
    )
    classifier_path = os.path.join(logdir, "model000002.pt")
    out_dir = str(tmp_path / "samples")
    _run_script(
        "classifier_sample.py",
        ["@digits16_model", "--model_path", os.path.join(REPO_ROOT, "models", "digits16.pt"),
         "--classifier_path", classifier_path, "--classifier_scale", "2", "--timestep_respacing", "4",
         "--num_samples", "3", "--batch_size", "3", "--out_dir", out_dir] + classifier_flags[2:],
        out_dir,
    )
    with np.load(os.path.join(out_dir, "samples_3x16x16x3.npz")) as data:
        assert data["arr_0"].shape == (3, 16, 16, 3)
        assert ((0 <= data["arr_1"]) & (data["arr_1"] < 10)).all()


def test_training_scripts_need_existing_data(tmp_path):
    for script, flags, message in (
        ("image_train.py", [], "--data_dir is required"),
        ("classifier_train.py", ["--data_dir", str(tmp_path / "nothing")], "no such file or folder"),
    ):
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OPENAI_LOGDIR=str(tmp_path / "logs"))
        res = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", script)] + flags,
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2
        assert message in res.stderr and "Traceback" not in res.stderr
        assert not os.path.exists(tmp_path / "logs")


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH")
def test_two_rank_training_keeps_replicas_equal(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    helper = os.path.join(REPO_ROOT, "tests", "mpi_train_helper.py")
    res = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, helper, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ALL OK" in res.stdout
