import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch as th

from conftest import REPO_ROOT

from guided_diffusion import dist_util, logger


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # Two ranks on a host with one GPU share it.
    env["GUIDED_DIFFUSION_SHARE_GPUS"] = "1"
    return env


# ---------------------------------------------------------------- dist_util


def test_setup_dist_single_process_twice():
    # A subprocess keeps the process group out of the test session.
    code = textwrap.dedent(
        """
        import os, torch as th, torch.distributed as dist
        from guided_diffusion import dist_util
        before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        dist_util.setup_dist()
        dist_util.setup_dist()
        # The launcher's variables are left alone.
        assert {k: os.environ.get(k) for k in before} == before, os.environ
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        t = th.tensor([2.0]); dist.all_reduce(t); assert t.item() == 2.0
        p = [th.ones(2)]; dist_util.sync_params(p); assert th.equal(p[0], th.ones(2))
        print("backend", dist.get_backend(), "dev", dist_util.dev())
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    expected_backend = "cuda:nccl,cpu:gloo" if th.cuda.is_available() else "gloo"
    expected_dev = "cuda:0" if th.cuda.is_available() else "cpu"
    assert f"backend {expected_backend} dev {expected_dev}" in res.stdout


def test_dev_single_process():
    expected = "cuda:0" if th.cuda.is_available() else "cpu"
    assert dist_util.dev() == th.device(expected)


def test_load_state_dict_round_trip(tmp_path, monkeypatch):
    state = {"weight": th.randn(5, 3), "bias": th.arange(4), "nested": {"n": 3}}
    path = str(tmp_path / "model000012.pt")
    th.save(state, path)
    # Several chunks must concatenate back to the same bytes.
    monkeypatch.setattr(dist_util, "_CHUNK_SIZE", 100)
    loaded = dist_util.load_state_dict(path, map_location="cpu")
    assert set(loaded) == {"weight", "bias", "nested"}
    assert th.equal(loaded["weight"], state["weight"])
    assert th.equal(loaded["bias"], state["bias"])
    assert loaded["nested"] == {"n": 3}


def test_load_state_dict_missing_file_names_path(tmp_path):
    path = str(tmp_path / "nope" / "model000100.pt")
    with pytest.raises(FileNotFoundError) as info:
        dist_util.load_state_dict(path)
    assert str(info.value) == f"checkpoint file not found: {path}"


def test_sync_params_without_process_group_leaves_values():
    p = [th.full((2,), 3.0)]
    dist_util.sync_params(p)
    assert th.equal(p[0], th.full((2,), 3.0))


def test_master_address(monkeypatch):
    import socket

    # All ranks on one machine: loopback, without asking the resolver.
    monkeypatch.setattr(socket, "gethostbyname", lambda name: pytest.fail("resolver called"))
    assert dist_util._master_address(single_host=True) == "127.0.0.1"

    monkeypatch.setattr(socket, "getfqdn", lambda: "node0.cluster")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"node0.cluster": "10.0.0.5"}[name])
    assert dist_util._master_address(single_host=False) == "10.0.0.5"

    # Debian's /etc/hosts maps the host's own name to 127.0.1.1, which no other machine reaches: take the
    # host's other address, or say what to set.
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    addrs = [(socket.AF_INET, 0, 0, "", ("127.0.1.1", 0)), (socket.AF_INET, 0, 0, "", ("10.0.0.7", 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addrs)
    assert dist_util._master_address(single_host=False) == "10.0.0.7"
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: addrs[:1])
    with pytest.raises(RuntimeError, match="resolves only to loopback .127.0.1.1.*set MASTER_ADDR"):
        dist_util._master_address(single_host=False)

    def unresolvable(name):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", unresolvable)
    with pytest.raises(RuntimeError, match="cannot resolve the address of rank 0's host 'node0.cluster'"):
        dist_util._master_address(single_host=False)


def test_find_free_port_is_bindable():
    import socket

    port = dist_util._find_free_port()
    assert 0 < port < 65536
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("", port))
    finally:
        s.close()


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec not on PATH")
def test_two_ranks_under_mpiexec(tmp_path):
    helper = os.path.join(REPO_ROOT, "tests", "mpi_dist_helper.py")
    res = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, helper, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ALL OK" in res.stdout


# ---------------------------------------------------------------- logger


@pytest.fixture
def fresh_logger(monkeypatch):
    for var in ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "OPENAI_LOGDIR", "OPENAI_LOG_FORMAT"]:
        monkeypatch.delenv(var, raising=False)
    previous = logger.Logger.CURRENT
    yield
    if logger.Logger.CURRENT is not previous and logger.Logger.CURRENT is not None:
        logger.Logger.CURRENT.close()
    logger.Logger.CURRENT = previous


def _read_csv(path):
    with open(path) as f:
        return [line.rstrip("\n").split(",") for line in f]


def test_logger_writes_csv_json_and_log(tmp_path, fresh_logger):
    logdir = str(tmp_path / "logs")
    logger.configure(dir=logdir, format_strs=["log", "csv", "json"])
    assert logger.get_dir() == logdir

    logger.logkv("step", 0)
    logger.logkv_mean("loss", 1.0)
    logger.logkv_mean("loss", 2.0)
    logger.logkv_mean("loss", 6.0)
    out = logger.dumpkvs()
    assert out == {"step": 0, "loss": 3.0}
    assert logger.getkvs() == {}

    logger.logkvs({"step": 1, "loss": 0.5, "grad_norm": 4.0})
    logger.dumpkvs()

    rows = _read_csv(os.path.join(logdir, "progress.csv"))
    # The column seen only in the second dump is appended and the first row padded.
    assert rows == [
        ["loss", "step", "grad_norm"],
        ["3.0", "0", ""],
        ["0.5", "1", "4.0"],
    ]

    with open(os.path.join(logdir, "progress.json")) as f:
        records = [json.loads(line) for line in f]
    assert records == [{"loss": 3.0, "step": 0}, {"grad_norm": 4.0, "loss": 0.5, "step": 1}]

    logger.log("hello", 42)
    logger.info("info line")
    logger.debug("hidden debug")
    logger.set_level(logger.DEBUG)
    logger.debug("shown debug")
    logger.set_level(logger.ERROR)
    logger.warn("hidden warn")
    logger.error("shown error")
    with open(os.path.join(logdir, "log.txt")) as f:
        text = f.read()
    assert text == "\n".join(
        [
            f"Logging to {logdir}",
            "-------------------",
            "| loss | 3        |",
            "| step | 0        |",
            "-------------------",
            "------------------------",
            "| grad_norm | 4        |",
            "| loss      | 0.5      |",
            "| step      | 1        |",
            "------------------------",
            "hello 42",
            "info line",
            "shown debug",
            "shown error",
            "",
        ]
    )


def test_logger_human_table_truncates_long_keys(tmp_path, fresh_logger):
    logdir = str(tmp_path)
    logger.configure(dir=logdir, format_strs=["log"])
    logger.logkv("k" * 40, "value")
    logger.dumpkvs()
    with open(os.path.join(logdir, "log.txt")) as f:
        lines = f.read().splitlines()
    assert lines[1:] == ["-" * 42, "| " + "k" * 27 + "... | value |", "-" * 42]


def test_logger_uses_openai_logdir_and_rank_suffix(tmp_path, monkeypatch, fresh_logger):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    monkeypatch.setenv("PMI_RANK", "3")
    logger.configure()
    assert logger.get_dir() == str(tmp_path / "from_env")
    # Ranks above 0 only write a suffixed text log by default.
    assert os.listdir(tmp_path / "from_env") == ["log-rank003.txt"]


def test_logger_default_dir_is_under_tmp(fresh_logger, monkeypatch):
    import tempfile

    logger.configure(format_strs=[])
    d = logger.get_dir()
    try:
        assert os.path.dirname(d) == tempfile.gettempdir()
        assert os.path.basename(d).startswith("openai-")
    finally:
        os.rmdir(d)


def test_logger_unknown_format(tmp_path, fresh_logger):
    with pytest.raises(ValueError, match="Unknown format specified: 'tensorboard'"):
        logger.configure(dir=str(tmp_path), format_strs=["tensorboard"])


def test_profile_kv_and_scoped_configure(tmp_path, fresh_logger, monkeypatch):
    outer = str(tmp_path / "outer")
    inner = str(tmp_path / "inner")
    logger.configure(dir=outer, format_strs=["csv"])
    outer_logger = logger.get_current()

    times = iter([10.0, 12.5])
    monkeypatch.setattr(logger.time, "time", lambda: next(times))
    with logger.profile_kv("data"):
        pass
    assert logger.getkvs() == {"wait_data": 2.5}

    with logger.scoped_configure(dir=inner, format_strs=["json"]):
        assert logger.get_dir() == inner
        logger.logkv("x", 1)
        logger.dumpkvs()
    assert logger.get_current() is outer_logger
    with open(os.path.join(inner, "progress.json")) as f:
        assert json.loads(f.read()) == {"x": 1}
