"""
--shard i/n on the samplers and scripts/merge_shards.py: the merged shards are the npz one whole run writes.
"""

import os

import numpy as np
import pytest

from conftest import load_script

from guided_diffusion.run import run_store
from guided_diffusion.common.errors import UsageError

# The embedded digits model, five steps; seven samples in batches of two make four batches.
TINY_RUN = ["--timestep_respacing", "5", "--num_samples", "7", "--batch_size", "2", "--seed", "5", "--grid", ""]
# The embedded default also samples an unguided comparison (--compare True); these tests check one run.
TINY_RUN += ["--compare", "False"]


@pytest.fixture(scope="module")
def merge():
    return load_script("merge_shards")


@pytest.fixture(scope="module")
def whole_run(image_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    with np.load(image_sample.main(TINY_RUN + ["--out_dir", str(out)])) as data:
        return {k: data[k] for k in data.files}


def test_shard_ranges_follow_whole_batches():
    assert [run_store.shard_range(7, 2, (i, 3)) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [run_store.shard_range(8, 3, (i, 2)) for i in range(2)] == [(0, 3), (3, 8)]
    assert run_store.shard_range(7, 2, None) == (0, 7)
    with pytest.raises(UsageError, match=r"--shard 0/5: 7 samples in batches of 2 make only 4 batch\(es\); use at"):
        run_store.shard_range(7, 2, (0, 5))


@pytest.mark.parametrize("text, message", [
    ("2", "--shard '2' is malformed: expected i/n"),
    ("a/3", "--shard 'a/3' is malformed"),
    ("3/3", "--shard '3/3': the shard index must be 0 .. 2 for 3 shards"),
    ("0/0", "--shard '0/0': the shard index must be 0 .. -1 for 0 shards"),
])
def test_bad_shard_flags(text, message):
    with pytest.raises(UsageError) as info:
        run_store.parse_shard(text)
    assert str(info.value).startswith(message)


def test_shards_merge_into_the_whole_run(image_sample, merge, whole_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "shards"
    flags = TINY_RUN + ["--out_dir", str(out)]
    image_sample.main(flags + ["--shard", "1/3"])
    # A merge before every shard is done names the missing ones.
    with pytest.raises(SystemExit) as stopped:
        merge.main([str(out)])
    assert stopped.value.code == 2
    assert "shard(s) 0/3, 2/3 of samples_7x16x16x3 are not finished" in capsys.readouterr().err

    # Shard 2 (samples 4 .. 6, two batches) is interrupted after its first batch and resumed.
    monkeypatch.setenv(run_store.STOP_AFTER_ENV, "1")
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(flags + ["--shard", "2/3"])
    assert stopped.value.code == run_store.STOP_EXIT_CODE
    assert sorted(os.listdir(out / "samples_7x16x16x3_shard2of3_parts")) == ["000000004-000000006.npz", "run.json"]
    monkeypatch.delenv(run_store.STOP_AFTER_ENV)
    image_sample.main(flags + ["--shard", "2/3"])
    image_sample.main(flags + ["--shard", "0/3"])
    names = sorted(n for n in os.listdir(out) if n.endswith(".npz"))
    assert names == [f"samples_7x16x16x3_shard{i}of3.npz" for i in range(3)]

    merged = merge.main([str(out)])
    assert os.path.basename(merged) == "samples_7x16x16x3.npz"
    with np.load(merged) as data:
        assert data.files == sorted(whole_run)
        for key in whole_run:
            np.testing.assert_array_equal(data[key], whole_run[key])


def test_merge_rejects_shards_of_different_batch_sizes(image_sample, merge, tmp_path, capsys):
    out = tmp_path / "mixed"
    flags = TINY_RUN + ["--out_dir", str(out), "--timestep_respacing", "2"]
    image_sample.main(flags + ["--shard", "0/2", "--batch_size", "3"])  # samples 0 .. 2
    image_sample.main(flags + ["--shard", "1/2"])  # batches of 2: samples 4 .. 6
    with pytest.raises(SystemExit):
        merge.main([str(out)])
    assert "samples_7x16x16x3_shard1of2.npz holds samples 4 .. 6, but the shards before it end at 3" in (
        capsys.readouterr().err
    )
    assert not os.path.exists(out / "samples_7x16x16x3.npz")


def test_bad_shard_is_one_usage_line(image_sample, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        image_sample.main(TINY_RUN + ["--out_dir", str(tmp_path / "bad"), "--shard", "5/2"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: --shard '5/2': the shard index must be 0 .. 1 for 2 shards")
    assert not os.path.exists(tmp_path / "bad")


def test_shards_of_a_row_lock_separately(tmp_path):
    # A row's shards are independent jobs in one folder: each holds its own lock, and a second job on the same
    # shard is still refused.
    from types import SimpleNamespace

    shard0, shard1 = SimpleNamespace(shard="0/2"), SimpleNamespace(shard="1/2")
    lock = run_store.RunLock(str(tmp_path), run_store.lock_name(shard0))
    assert lock.acquire() is None
    try:
        assert run_store.lock_holder(str(tmp_path), run_store.lock_name(shard1)) is None
        assert run_store.lock_holder(str(tmp_path), run_store.lock_name(shard0)) is not None
        assert run_store.lock_name(SimpleNamespace(shard="")) == run_store.LOCK_NAME
    finally:
        lock.release()


def test_a_finished_shard_rerun_is_complete_not_refused(image_sample, tmp_path, capsys):
    args = TINY_RUN + ["--out_dir", str(tmp_path), "--shard", "1/2"]
    first = image_sample.main(args)
    capsys.readouterr()
    assert image_sample.main(args) == first
    assert "already complete" in capsys.readouterr().out
