"""
The sampler's final join and merge_shards in bounded memory, byte for byte what np.savez wrote; and the faults that
lose no samples: a full disk, too little free disk, a damaged part, a kill during the final write.
"""

import errno
import json
import os
import time

import numpy as np
import pytest

from conftest import REPO_ROOT, load_script

from guided_diffusion.common import npz_stream
from guided_diffusion.run import run_store
from guided_diffusion.common.atomic_io import save_npz_atomic
from guided_diffusion.common.npz_stream import join_npz, npz_heads, npz_layout

# The embedded digits model, five steps; seven samples in batches of two make four parts.
TINY_RUN = ["--timestep_respacing", "5", "--num_samples", "7", "--batch_size", "2", "--seed", "5", "--grid", ""]
TINY_RUN += ["--compare", "False"]
FINAL = "samples_7x16x16x3.npz"
PARTS = "samples_7x16x16x3_parts"


@pytest.fixture(scope="module")
def whole_run(image_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    path = image_sample.main(TINY_RUN + ["--out_dir", str(out)])
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_same(path, expected):
    found = _load(path)
    assert sorted(found) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key])


def _parts(folder, sizes, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    paths, start = [], 0
    for size in sizes:
        arrays = [rng.integers(0, 256, (size, 4, 5, 3), dtype=np.uint8)]
        if labels:
            arrays.append(rng.integers(0, 1000, size))
        paths.append(str(folder / run_store.part_name(start, start + size)))
        save_npz_atomic(paths[-1], arrays)
        start += size
    return paths


def _frozen_zip_time(monkeypatch):
    # A zip member records the time it was written; the bytes can only be compared when both share it.
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)


@pytest.mark.parametrize("extra", [None, {"sample_range": np.array([4, 11])}])
def test_streamed_join_is_byte_for_byte_np_savez(tmp_path, monkeypatch, extra):
    paths = _parts(tmp_path, [3, 1, 2, 1])
    _frozen_zip_time(monkeypatch)
    monkeypatch.setattr(npz_stream, "COPY_CHUNK_BYTES", 7)  # chunks that cut rows and headers
    join_npz(tmp_path / "streamed.npz", [(p, npz_layout(p)) for p in paths], ["arr_0", "arr_1"], extra)
    parts = [_load(p) for p in paths]
    whole = {k: np.concatenate([part[k] for part in parts]) for k in ("arr_0", "arr_1")}
    np.savez(tmp_path / "whole.npz", **whole, **(extra or {}))
    assert (tmp_path / "streamed.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    heads = npz_heads(tmp_path / "streamed.npz", 2)
    np.testing.assert_array_equal(heads[0], whole["arr_0"][:2])
    np.testing.assert_array_equal(heads[1], whole["arr_1"][:2])


def test_join_and_merge_peak_memory_stays_well_under_the_result(tmp_path):
    bench = load_script("benchmarks/join_memory.py")
    results = bench.run(128 * 2**20, str(tmp_path), kinds=("join", "merge"), image_size=128, batch_size=64)
    for kind, result in results.items():
        assert result["result"] > 120 * 2**20
        # The earlier join grew by about 2x the result; the streamed one by a few chunks.
        assert result["growth"] < 0.5, (kind, result)
    assert _load(results["join"]["path"])["arr_0"].shape[0] == _load(results["merge"]["path"])["arr_0"].shape[0]


def _run(image_sample, out, capsys, *extra):
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(TINY_RUN + ["--out_dir", str(out), *extra])
    captured = capsys.readouterr()
    return stopped.value.code, captured.err


def _one_error_line(err):
    # (Progress bars share stderr; they end in "\r" or an escape sequence, the error on its own line.)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err and "During handling" not in err
    return lines[0]


def test_a_full_disk_names_the_file_keeps_the_parts_and_the_rerun_finishes(
    image_sample, whole_run, tmp_path, monkeypatch, capsys
):
    writes = []

    def full_after_two(path, arrays, compressed=False):
        writes.append(path)
        if len(writes) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_npz_atomic(path, arrays)

    monkeypatch.setattr(run_store, "save_npz_atomic", full_after_two)
    code, err = _run(image_sample, tmp_path, capsys)
    assert code != 0
    line = _one_error_line(err)
    assert f"cannot write {writes[2]}: no space left on device" in line
    assert f"The finished parts in {tmp_path / PARTS} are safe" in line and "rerun the same command to resume" in line
    # The two finished parts and the run's record stay (beside them, each batch's cost record).
    kept = sorted(n for n in os.listdir(tmp_path / PARTS) if not n.startswith("cost-"))
    assert kept == ["000000000-000000002.npz", "000000002-000000004.npz", "run.json"]
    monkeypatch.undo()
    _assert_same(image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)]), whole_run)


def test_a_full_disk_during_the_final_write_leaves_the_parts_and_no_temporary_file(
    image_sample, whole_run, tmp_path, monkeypatch, capsys
):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz_stream._ArrayStream, "write_bytes", full)
    code, err = _run(image_sample, tmp_path, capsys)
    assert code != 0
    line = _one_error_line(err)
    assert f"cannot write {tmp_path / FINAL}: no space left on device" in line and "are safe" in line
    assert sorted(n for n in os.listdir(tmp_path) if n != "log.txt") == [PARTS]
    assert len([n for n in os.listdir(tmp_path / PARTS) if n.endswith(".npz")]) == 4
    monkeypatch.undo()
    _assert_same(image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)]), whole_run)


def test_too_little_free_disk_is_said_before_joining(image_sample, whole_run, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_store.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    code, err = _run(image_sample, tmp_path, capsys)
    assert code == 2
    line = _one_error_line(err)
    needed = sum(os.path.getsize(tmp_path / PARTS / n) for n in os.listdir(tmp_path / PARTS) if n.endswith(".npz"))
    assert f"not enough free disk space in {tmp_path} to write {FINAL}: it needs {needed} bytes" in line
    assert "1000 bytes (0.00 GiB) are free" in line and f"The finished parts are kept in {tmp_path / PARTS}" in line
    assert not (tmp_path / FINAL).exists()
    monkeypatch.undo()
    _assert_same(image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)]), whole_run)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _flip_a_sample_bit(path):
    data = bytearray(path.read_bytes())
    data[300] ^= 0x10  # inside arr_0's samples, past the zip and npy headers
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip_a_sample_bit])
def test_a_damaged_part_is_set_aside_when_resuming_and_sampled_again(
    image_sample, whole_run, tmp_path, monkeypatch, capsys, damage
):
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "2")
    code, _ = _run(image_sample, tmp_path, capsys)
    assert code == run_store.STOP_EXIT_CODE
    part = tmp_path / PARTS / "000000002-000000004.npz"
    damage(part)
    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    calls = []
    from guided_diffusion.run import sampling_cli

    sample_images = sampling_cli.sample_images

    def counted(*args, **kwargs):
        out = sample_images(*args, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr(sampling_cli, "sample_images", counted)
    path = image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"set aside the damaged sample part {part} as {part.name}.bad (" in out
    assert "its samples are sampled again" in out
    _assert_same(path, whole_run)
    assert calls == [2, 2, 1]  # the damaged part and the two left; the first part was kept


def test_a_part_damaged_before_the_join_is_one_line_and_set_aside(tmp_path):
    parts_dir = tmp_path / "samples_5x4x5x3_parts"
    parts_dir.mkdir()
    paths = _parts(parts_dir, [2, 3])
    _flip_a_sample_bit(type(tmp_path)(paths[1]))
    final = tmp_path / "samples_5x4x5x3.npz"
    plan = run_store.SamplingPlan(str(tmp_path), None, 0, 5, str(final), str(parts_dir), "", [], [], [])
    from types import SimpleNamespace

    error = run_store.join_parts(plan, (4, 5, 3), SimpleNamespace(out_dir=str(tmp_path)))
    assert error.startswith(f"set aside the damaged sample part {paths[1]} as 000000002-000000005.npz.bad (")
    assert "Bad CRC-32" in error and error.endswith("rerun the same command to sample it again")
    assert sorted(os.listdir(parts_dir)) == ["000000000-000000002.npz", "000000002-000000005.npz.bad"]
    assert sorted(os.listdir(tmp_path)) == [parts_dir.name]  # no final .npz, no temporary file


class _Killed(BaseException):
    """Stands for a kill -9: nothing after it runs, no cleanup."""


def test_killed_during_the_final_write_records_nothing_and_the_rerun_clears_the_leftover(
    image_sample, whole_run, tmp_path, monkeypatch, capsys
):
    dead_pid = 4_194_304 + 1  # above Linux's largest pid_max
    leftover = tmp_path / f".tmp-{dead_pid}-{FINAL}"
    # Another run's leftover (a shard of the same folder) is not this run's to remove.
    other = tmp_path / f".tmp-{dead_pid}-samples_7x16x16x3_shard0of2.npz"
    other.write_bytes(b"x")

    def killed(out_path, sources, keys, extra=None):
        leftover.write_bytes(b"PK half an npz")
        raise _Killed

    monkeypatch.setattr(run_store, "join_npz", killed)
    with pytest.raises(_Killed):
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)])
    # No record claims samples that are not there.
    assert not (tmp_path / FINAL).exists() and not (tmp_path / "samples_7x16x16x3.json").exists()
    monkeypatch.undo()
    path = image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)])
    _assert_same(path, whole_run)
    assert not leftover.exists() and other.exists()
    assert f"removed {leftover}, left by a run killed while it wrote its final samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "samples_7x16x16x3.json").read_text())["complete"] is True


def test_killed_between_the_final_npz_and_its_record_the_rerun_finishes(
    image_sample, whole_run, tmp_path, monkeypatch, capsys
):
    def killed(path, obj):
        raise _Killed

    monkeypatch.setattr(run_store, "write_json_atomic", killed)
    with pytest.raises(_Killed):
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)])
    assert (tmp_path / FINAL).exists() and (tmp_path / PARTS).is_dir()
    monkeypatch.undo()
    _assert_same(image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path)]), whole_run)
    record = json.loads((tmp_path / "samples_7x16x16x3.json").read_text())
    assert record["complete"] is True and not (tmp_path / PARTS).exists()


def test_a_damaged_shard_is_one_line_for_the_merge(image_sample, tmp_path, capsys):
    merge = load_script("merge_shards")
    for index in range(2):
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path), "--shard", f"{index}/2"])
    shard = tmp_path / "samples_7x16x16x3_shard1of2.npz"
    _truncate(shard)
    with pytest.raises(SystemExit) as stopped:
        merge.main([str(tmp_path)])
    assert stopped.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{shard}: not a readable npz file" in line and "sample that shard again" in line
    assert not (tmp_path / FINAL).exists()



def test_merged_shards_carry_the_record_one_run_keeps(image_sample, whole_run, tmp_path, capsys):
    merge = load_script("merge_shards")
    whole = tmp_path / "whole"
    image_sample.main(TINY_RUN + ["--out_dir", str(whole)])
    shards = tmp_path / "shards"
    for index in range(2):
        image_sample.main(TINY_RUN + ["--out_dir", str(shards), "--shard", f"{index}/2"])
    merged = merge.main([str(shards)])
    _assert_same(merged, whole_run)
    record = json.loads((shards / "samples_7x16x16x3.json").read_text())
    expected = json.loads((whole / "samples_7x16x16x3.json").read_text())
    assert record["complete"] is True and record["npz"] == FINAL
    assert record["record"] == expected["record"]
    assert [m["npz"] for m in record["merged_from"]] == [f"samples_7x16x16x3_shard{i}of2.npz" for i in range(2)]
    # The whole row's command, run on the merged folder, finds its samples finished.
    capsys.readouterr()
    assert image_sample.main(TINY_RUN + ["--out_dir", str(shards)]) == str(shards / FINAL)
    assert f"{shards / FINAL} is already complete (same settings" in capsys.readouterr().out


def test_shards_of_other_settings_are_not_merged(image_sample, tmp_path, capsys):
    merge = load_script("merge_shards")
    image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path), "--shard", "0/2"])
    image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path), "--shard", "1/2", "--pag_scale", "0.5"])
    with pytest.raises(SystemExit) as stopped:
        merge.main([str(tmp_path)])
    assert stopped.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "shard1of2.npz was sampled with other settings than samples_7x16x16x3_shard0of2.npz" in line
    assert "--pag_scale" in line and not (tmp_path / FINAL).exists()


def test_merge_says_when_the_disk_is_too_small(image_sample, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    merge = load_script("merge_shards")
    for index in range(2):
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path), "--shard", f"{index}/2"])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_store.shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 5, 5))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        merge.main([str(tmp_path)])
    assert stopped.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"not enough free disk space in {tmp_path} to write {FINAL}" in line
    assert "5 bytes (0.00 GiB) are free. The shard files are kept" in line and not (tmp_path / FINAL).exists()


SLOW_FINAL_WRITE = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import load_script
from guided_diffusion.common import npz_stream

write = npz_stream._ArrayStream.write_bytes

def slow(self, data):
    # The final write goes slowly, so that the test can kill the process in the middle of it.
    write(self, data)
    time.sleep(60)

npz_stream._ArrayStream.write_bytes = slow
load_script("image_sample").main({argv!r})
"""


def test_kill_9_during_the_final_write(image_sample, whole_run, tmp_path, capsys):
    import signal
    import subprocess
    import sys

    argv = TINY_RUN + ["--out_dir", str(tmp_path)]
    code = SLOW_FINAL_WRITE.format(tests=os.path.join(REPO_ROOT, "tests"), argv=argv)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(f".tmp-{child.pid}-samples_") for n in os.listdir(tmp_path)):
            assert child.poll() is None and time.monotonic() < deadline, "the child never reached its final write"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftover = tmp_path / f".tmp-{child.pid}-{FINAL}"
    assert leftover.exists() and not (tmp_path / FINAL).exists()
    assert not (tmp_path / "samples_7x16x16x3.json").exists()  # no record of samples that are not there
    _assert_same(image_sample.main(argv), whole_run)
    assert not leftover.exists()
    assert json.loads((tmp_path / "samples_7x16x16x3.json").read_text())["complete"] is True


def test_a_run_warns_at_start_when_the_disk_is_too_small(image_sample, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    # Room for the parts (7 x 768 bytes of images), not for the final .npz beside them.
    monkeypatch.setattr(run_store.shutil, "disk_usage", lambda folder: usage(10**9, 0, 7000))
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    code, _ = _run(image_sample, tmp_path, capsys)
    assert code == run_store.STOP_EXIT_CODE
    log = (tmp_path / "log.txt").read_text()
    assert f"warning: {tmp_path} has 7000 bytes (0.00 GiB) free, but this run needs about 10752 bytes" in log
