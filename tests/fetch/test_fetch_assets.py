"""
scripts/fetch_assets.py and guided_diffusion/common/assets.py, offline: an HTTP server on 127.0.0.1, started here, serves
files made here (a tiny checkpoint, truncated copies, a connection dropped half-way), reached through the URL
override.
"""

import hashlib
import http.server
import io
import json
import os
import re
import threading
import types

import numpy as np
import pytest
import torch

from guided_diffusion.fetch import asset_checks
from guided_diffusion.common import assets
from guided_diffusion import script_util as su
from guided_diffusion.fetch.download import part_path
from guided_diffusion.run.flag_files import config_path

from conftest import REPO_ROOT, TINY_ADM_FLAGS, load_script, reference_file

fetch_assets = load_script("fetch_assets")


class FileServer:
    """Serves `files` ({name: bytes}) with Range, If-Range and HEAD; `drop[name] = n` cuts the next response after n bytes."""

    def __init__(self):
        self.files, self.drop, self.requests = {}, {}, []
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body_too):
                name = self.path.lstrip("/")
                server.requests.append((self.command, name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start = 0
                wanted = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if wanted and not server.ignore_range and (if_range is None or if_range == etag):
                    start = int(re.match(r"bytes=(\d+)-", wanted).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", etag)
                self.end_headers()
                if not body_too:
                    return
                body = data[start:]
                cut = server.drop.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self):
                self._send(True)

            def do_HEAD(self):
                self._send(False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self, name):
        return [r for r in self.requests if r[0] == "GET" and r[1] == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def tiny_checkpoint_bytes(**overrides):
    flags = {**TINY_ADM_FLAGS, **overrides}
    torch.manual_seed(0)
    model = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **flags})[0]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


TINY = assets.Asset(
    "tiny_unet.pt", "http://published.invalid/tiny_unet.pt", "models", "checkpoint", "a tiny ADM U-Net", "this test",
    "model", dict(TINY_ADM_FLAGS),
)


@pytest.fixture(scope="module")
def tiny_bytes():
    return tiny_checkpoint_bytes()


def options(server, dest, **kw):
    return types.SimpleNamespace(
        dest=str(dest), force=False, base_url=server.url, attempts=3, retry_wait=0.0, timeout=10.0, **kw
    )


def fetch(asset, opts):
    log = []
    reason = fetch_assets.fetch_one(asset, opts, log=log.append)
    return reason, "\n".join(log)


def test_checkpoint_is_downloaded_verified_and_placed(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    reason, log = fetch(TINY, options(server, tmp_path))
    assert reason is None
    final = tmp_path / "tiny_unet.pt"
    assert final.read_bytes() == tiny_bytes
    assert sorted(os.listdir(tmp_path)) == ["tiny_unet.pt"]  # no .part or state file left behind
    assert "loads with strict=True" in log


def test_dropped_connection_resumes_with_a_range_request(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    half = len(tiny_bytes) // 2
    server.drop["tiny_unet.pt"] = half
    reason, log = fetch(TINY, options(server, tmp_path))
    assert reason is None, reason
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes
    assert [r[2] for r in server.gets("tiny_unet.pt")] == [None, f"bytes={half}-"]
    assert f"dropped at {half} of {len(tiny_bytes)} bytes" in log


def test_incomplete_download_is_kept_as_part_and_the_next_run_resumes_it(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    third = len(tiny_bytes) // 3
    server.drop["tiny_unet.pt"] = third
    opts = options(server, tmp_path)
    opts.attempts = 1
    reason, _ = fetch(TINY, opts)
    assert f"stopped at {third} of {len(tiny_bytes)} bytes" in reason and "run the same command again" in reason
    assert not (tmp_path / "tiny_unet.pt").exists()
    assert os.path.getsize(part_path(str(tmp_path / "tiny_unet.pt"))) == third
    reason, _ = fetch(TINY, opts)
    assert reason is None
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes
    assert server.gets("tiny_unet.pt")[-1][2] == f"bytes={third}-"
    assert sorted(os.listdir(tmp_path)) == ["tiny_unet.pt"]


def test_a_complete_part_file_is_verified_and_placed(server, tmp_path, tiny_bytes):
    # A run stopped between the last byte and the rename: the server has nothing after it (HTTP 416).
    server.files["tiny_unet.pt"] = tiny_bytes
    with open(part_path(str(tmp_path / "tiny_unet.pt")), "wb") as f:
        f.write(tiny_bytes)
    reason, _ = fetch(TINY, options(server, tmp_path))
    assert reason is None
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes
    assert server.gets("tiny_unet.pt")[-1][2] == f"bytes={len(tiny_bytes)}-"


def test_unwritable_destination_is_one_line(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    (tmp_path / "file").write_text("")
    reason, _ = fetch(TINY, options(server, tmp_path / "file" / "sub"))
    assert reason.startswith("tiny_unet.pt: cannot write ") and "\n" not in reason


def test_a_server_that_ignores_range_restarts_from_zero(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    server.drop["tiny_unet.pt"] = 1000
    server.ignore_range = True
    reason, log = fetch(TINY, options(server, tmp_path))
    assert reason is None
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes
    assert "starting over" in log


def test_changed_file_on_the_server_is_fetched_again_from_the_start(server, tmp_path, tiny_bytes):
    # If-Range: a part file of an older version is not completed with the new version's bytes.
    server.files["tiny_unet.pt"] = b"x" * len(tiny_bytes)
    server.drop["tiny_unet.pt"] = 500
    opts = options(server, tmp_path)
    opts.attempts = 1
    assert fetch(TINY, opts)[0] is not None
    server.files["tiny_unet.pt"] = tiny_bytes
    reason, _ = fetch(TINY, opts)
    assert reason is None
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes


def test_truncated_checkpoint_is_refused_and_not_left_in_place(server, tmp_path, tiny_bytes):
    # The server itself holds a cut copy, so the size matches its Content-Length and only the load check sees it.
    server.files["tiny_unet.pt"] = tiny_bytes[: len(tiny_bytes) * 2 // 3]
    reason, _ = fetch(TINY, options(server, tmp_path))
    assert reason.startswith("tiny_unet.pt: the file downloaded from")
    assert "torch.load cannot read it" in reason and "nothing was put at" in reason
    assert "\n" not in reason
    assert os.listdir(tmp_path) == []


def test_checkpoint_of_another_architecture_is_refused(server, tmp_path):
    server.files["tiny_unet.pt"] = tiny_checkpoint_bytes(class_cond=False)
    reason, _ = fetch(TINY, options(server, tmp_path))
    assert "its keys do not fit the architecture of tiny_unet.pt" in reason
    assert "1 missing (e.g. label_emb.weight)" in reason
    assert os.listdir(tmp_path) == []


def test_present_verified_file_is_skipped_without_a_request(server, tmp_path, tiny_bytes):
    (tmp_path / "tiny_unet.pt").write_bytes(tiny_bytes)
    reason, log = fetch(TINY, options(server, tmp_path))
    assert reason is None
    assert "present at" in log and "skipped" in log
    assert server.requests == []


def test_present_wrong_file_is_reported_and_replaced_only_with_force(server, tmp_path, tiny_bytes):
    server.files["tiny_unet.pt"] = tiny_bytes
    (tmp_path / "tiny_unet.pt").write_bytes(b"not a checkpoint")
    opts = options(server, tmp_path)
    reason, _ = fetch(TINY, opts)
    assert "is not the released one" in reason and "--force" in reason
    assert (tmp_path / "tiny_unet.pt").read_bytes() == b"not a checkpoint"
    assert server.requests == []
    opts.force = True
    assert fetch(TINY, opts)[0] is None
    assert (tmp_path / "tiny_unet.pt").read_bytes() == tiny_bytes


def test_sha256_prefix_in_the_name_is_checked(server, tmp_path):
    data = b"weights" * 1000
    prefix = hashlib.sha256(data).hexdigest()[:8]
    name = f"blob-{prefix}.pth"
    asset = assets.Asset(name, f"http://published.invalid/{name}", "models", "sha256_name", "weights", "this test")
    server.files[name] = data + b"!"
    reason, _ = fetch(asset, options(server, tmp_path))
    assert f"but its name says it starts with {prefix}" in reason
    assert os.listdir(tmp_path) == []
    server.files[name] = data
    reason, log = fetch(asset, options(server, tmp_path))
    assert reason is None and f"sha256 starts with {prefix}" in log
    assert asset_checks.sha256_prefix_in_name(assets.INCEPTION) == "6726825d"


def test_http_error_is_one_line(server, tmp_path):
    reason, _ = fetch(TINY, options(server, tmp_path))
    assert reason == f"tiny_unet.pt: {server.url}/tiny_unet.pt: the server answered HTTP 404 (Not Found)"


def npz_bytes(images):
    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    return buf.getvalue()


def test_command_line_reference_batch(server, tmp_path, capsys):
    name = "VIRTUAL_imagenet256_labeled.npz"
    server.files[name] = npz_bytes(np.zeros((4, 8, 8, 3), np.float32))
    argv = [name, "--dest", str(tmp_path), "--base_url", server.url, "--retry_wait", "0"]
    assert fetch_assets.main(argv) == 1
    err = capsys.readouterr().err
    assert "arr_0 is float32 of shape (4, 8, 8, 3), not uint8 N x H x W x 3 images" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1  # beside the progress bar
    assert not (tmp_path / name).exists()
    good = npz_bytes(np.zeros((4, 8, 8, 3), np.uint8))
    server.files[name] = good
    assert fetch_assets.main(argv) == 0
    assert (tmp_path / name).read_bytes() == good
    # The environment variable is the same override.
    os.remove(tmp_path / name)
    os.environ[assets.BASE_URL_ENV] = server.url
    try:
        assert fetch_assets.main(argv[:3]) == 0
    finally:
        del os.environ[assets.BASE_URL_ENV]
    assert (tmp_path / name).read_bytes() == good


def test_command_line_lpips_layers(server, tmp_path):
    layers = {f"lin{k}.model.1.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    buf = io.BytesIO()
    torch.save(layers, buf)
    server.files["lpips_vgg.pth"] = buf.getvalue()
    assert fetch_assets.main(["vgg.pth", "--dest", str(tmp_path), "--base_url", server.url]) == 0
    assert (tmp_path / "lpips_vgg.pth").exists()


def test_list_shows_every_file_size_destination_and_status(server, tmp_path, capsys):
    (tmp_path / "256x256_diffusion.pt").write_bytes(b"x" * 2048)
    with open(part_path(str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")), "wb") as f:
        f.write(b"y" * 1024)
    server.files["lpips_vgg.pth"] = b"z" * 3072
    assert fetch_assets.main(["--list", "--dest", str(tmp_path), "--base_url", server.url, "--remote_sizes"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for asset in assets.ASSETS:
        assert str(tmp_path / asset.name) in lines[asset.name]
    assert re.search(r"2\.0 KiB\s+present", lines["256x256_diffusion.pt"])
    assert "partial (1.0 KiB)" in lines["VIRTUAL_imagenet256_labeled.npz"]
    assert re.search(r"3\.0 KiB\s+missing", lines["lpips_vgg.pth"])
    assert "missing, size unknown (HTTP 404)" in lines["ffhq_10m.pt"]  # the mirror could have had it
    assert "adm256: 256x256_diffusion.pt, 256x256_diffusion_uncond.pt, 256x256_classifier.pt" in out
    assert all(group in fetch_assets.__doc__ for group in assets.GROUPS)
    assert not any(r[0] == "GET" for r in server.requests)
    assert fetch_assets.main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "missing, manual download" in lines["ffhq_10m.pt"]
    assert os.path.join(REPO_ROOT, "models", "256x256_diffusion.pt") in lines["256x256_diffusion.pt"]


def test_list_covers_every_released_file_the_docs_name():
    text = ""
    for doc in ("docs/reproduce.md", "docs/inverse.md", "evaluations/README.md"):
        with open(os.path.join(REPO_ROOT, doc)) as f:
            text += f.read()
    named = set(re.findall(r"`([A-Za-z0-9_.-]+\.(?:pt|pth|npz))`", text))
    ours = {"digits16.pt", "digits16_features.pt", "OUT.npz", "samples_NxHxWx3.npz"}
    assert named - ours, "the docs name no released file"
    assert sorted(named - ours - set(assets.by_name())) == []


def test_unknown_name_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        fetch_assets.main(["256x256_difusion.pt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown NAME '256x256_difusion.pt'" in err and "did you mean 256x256_diffusion.pt" in err


def test_manual_download_says_where_it_comes_from_and_goes(tmp_path, capsys):
    assert fetch_assets.main(["ffhq_10m.pt", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "drive.google.com" in err and str(tmp_path / "ffhq_10m.pt") in err and err.count("\n") == 1


def test_config_rows_fetch_exactly_what_they_need():
    def names(*args):
        chosen, notes = fetch_assets.resolve_names(list(args))
        return [a.name for a in chosen], notes

    assert names("adm128_cond_ddpm250_cg")[0] == [
        "128x128_diffusion.pt", "128x128_classifier.pt", "VIRTUAL_imagenet128_labeled.npz", assets.INCEPTION,
    ]
    assert names("adm256_*")[0] == [
        "256x256_diffusion_uncond.pt", "256x256_diffusion.pt", "VIRTUAL_imagenet256_labeled.npz", assets.INCEPTION,
    ]
    assert names("ffhq256_sr4_dps_pag")[0] == ["ffhq_10m.pt", assets.INCEPTION]
    chosen, notes = names("digits16_baseline")
    assert chosen == [] and all("nothing to fetch" in n for n in notes) and len(notes) == 2
    assert names("eval-imagenet256", "inception")[0] == ["VIRTUAL_imagenet256_labeled.npz", assets.INCEPTION]


def test_fetch_hint_names_the_command(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    default = os.path.join(REPO_ROOT, "models", "256x256_diffusion.pt")
    assert assets.fetch_hint(default) == "; fetch it with `python scripts/fetch_assets.py 256x256_diffusion.pt`"
    assert assets.fetch_hint("/data/adm/256x256_diffusion.pt").endswith("256x256_diffusion.pt --dest /data/adm`")
    assert "manual download" in assets.fetch_hint(os.path.join(REPO_ROOT, "models", "ffhq_10m.pt"))
    assert assets.fetch_hint("models/my_model.pt") == ""
    inception = assets.find(assets.INCEPTION)
    monkeypatch.setenv(assets.INCEPTION_PATH_ENV, "/data/fid/weights.pth")
    assert assets.destination(inception) == "/data/fid/weights.pth"  # where the evaluator looks first
    assert assets.destination(inception, "/elsewhere") == f"/elsewhere/{assets.INCEPTION}"
    assert assets.fetch_hint("/data/fid/weights.pth", assets.INCEPTION).endswith(f"py {assets.INCEPTION}`")
    assert assets.fetch_hint("/data/fid/other.pth", assets.INCEPTION) == ""


def test_missing_file_messages_name_the_fetch_command(tmp_path, monkeypatch):
    from guided_diffusion.run.checkpoints import resolve_checkpoint
    from guided_diffusion.common.errors import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as err:
        resolve_checkpoint("models/256x256_diffusion.pt", "--model_path", "diffusion model", "diffusion")
    assert f"python {REPO_ROOT}/scripts/fetch_assets.py 256x256_diffusion.pt --dest {tmp_path}/models" in str(err.value)

    from evaluations.npz_io import read_stats

    with pytest.raises(FileNotFoundError) as err:
        read_stats(str(tmp_path / "VIRTUAL_imagenet128_labeled.npz"))
    assert "fetch_assets.py VIRTUAL_imagenet128_labeled.npz --dest" in str(err.value)

    from evaluations.inception import find_inception_weights

    with pytest.raises(FileNotFoundError) as err:
        find_inception_weights(str(tmp_path / assets.INCEPTION))
    assert f"fetch_assets.py {assets.INCEPTION} --dest {tmp_path}" in str(err.value)

    from evaluations.restoration import load_lpips

    with pytest.raises(FileNotFoundError) as err:
        load_lpips(str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "lpips_vgg.pth"))
    assert f"fetch_assets.py vgg16-397923af.pth --dest {tmp_path}" in str(err.value)


def test_architectures_are_the_released_specs():
    with open(reference_file("state_dict_specs.json")) as f:
        specs = json.load(f)
    for name, spec in specs.items():
        builder, flags = assets.ARCHITECTURES[name]
        assert flags == spec["flags"], name
        asset = assets.find(name + ".pt")
        assert (asset.builder, asset.flags) == (builder, flags)
        with torch.device("meta"):
            state = {k: torch.empty(v) for k, v in spec["state_dict"].items()}
        asset_checks.check_state_dict(asset, state)
        del state[next(iter(state))]
        with pytest.raises(asset_checks.VerificationError, match="1 missing"):
            asset_checks.check_state_dict(asset, state)
    lsun = specs["256x256_diffusion_uncond"]
    with torch.device("meta"):
        state = {k: torch.empty(v) for k, v in lsun["state_dict"].items()}
    asset_checks.check_state_dict(assets.find("lsun_bedroom.pt"), state)


@pytest.mark.parametrize("config, architecture", [
    ("ffhq256_model", "ffhq_10m"),
    ("adm256_uncond_base", "256x256_diffusion_uncond"),
    ("adm256_cond_base", "256x256_diffusion"),
    ("adm128_model", "128x128_diffusion"),
])
def test_architectures_are_those_the_configs_build(config, architecture):
    # A checkpoint that passes the fetch check then also loads in the rows that use it.
    from guided_diffusion.run.flag_files import config_flags

    given = config_flags(config_path(config))
    defaults = su.model_and_diffusion_defaults()
    for key, value in assets.ARCHITECTURES[architecture][1].items():
        assert given.get(key, str(defaults[key])) == str(value), key
