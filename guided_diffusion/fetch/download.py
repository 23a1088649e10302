"""
Resumable HTTP downloads into a `.part` file beside the target, with the standard library only.

The part file is the resume point: a later call asks the server for the bytes after it (an HTTP Range request,
guarded by If-Range so that a file changed on the server is fetched again from the start). Nothing here renames
the part file into place; the caller does that once the file is verified.
"""

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request

CHUNK_BYTES = 1 << 20
USER_AGENT = "pag-adm-fetch/1"


class DownloadError(Exception):
    """A download that did not complete; the message says why and what to do."""


def part_path(path):
    return path + ".part"


def _state_path(path):
    # What the server said about the file the part belongs to (URL, size, validator), for the next resume.
    return part_path(path) + ".json"


def _read_state(path):
    try:
        with open(_state_path(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_state(path, state):
    with open(_state_path(path), "w") as f:
        json.dump(state, f)


def discard_part(path):
    for leftover in (part_path(path), _state_path(path)):
        if os.path.exists(leftover):
            os.remove(leftover)


def _validator(headers):
    # If-Range accepts a strong ETag or a Last-Modified date (a weak ETag would make every resume start over).
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); total None when it is '*'."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def _open(url, headers, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    return urllib.request.urlopen(request, timeout=timeout)


def _http_error(url, exc):
    return DownloadError(f"{url}: the server answered HTTP {exc.code} ({exc.reason})")


def remote_size(url, timeout=30):
    """The Content-Length a server gives for `url` (a HEAD request), or None when it gives none."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download_part(url, path, progress=None, attempts=3, retry_wait=2.0, timeout=60, log=print):
    """
    Download `url` into part_path(path), resuming what an earlier call left there, retrying a dropped connection
    up to `attempts` times in all. Returns the part file's path once it holds as many bytes as the server
    announced (Content-Length or Content-Range; when it announces none, whatever arrived before it closed).
    `progress(total, initial)` returns a bar with update(n) and close(), e.g. a tqdm.
    Raises DownloadError when the server refuses or the file is still incomplete after the last attempt; the
    part file is then kept, so the same call later resumes it.
    """
    part = part_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    total = None
    for attempt in range(1, attempts + 1):
        state = _read_state(path)
        offset = _size(part)
        if offset and state.get("url") not in (None, url):
            log(f"  {os.path.basename(part)} came from another URL: starting over")
            discard_part(path)
            offset, state = 0, {}
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if state.get("validator"):
                headers["If-Range"] = state["validator"]
        try:
            response = _open(url, headers, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                # Nothing after the part file: either it is complete or the server's file is shorter than it.
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == offset or (total is None and state.get("total") == offset):
                    return part
                log(f"  {os.path.basename(part)} is longer than the file on the server: starting over")
                discard_part(path)
                continue
            raise _http_error(url, exc) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
            if attempt == attempts:
                raise DownloadError(f"{url}: cannot connect ({reason})") from None
            log(f"  cannot connect ({reason}); trying again ({attempt + 1} of {attempts})")
            time.sleep(retry_wait)
            continue
        with response:
            if response.status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    log("  the server resumed at another offset: starting over")
                    discard_part(path)
                    continue
                mode = "ab"
            else:
                if offset:
                    log("  the server sent the whole file (it does not resume, or the file changed): starting over")
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            _write_state(path, {"url": url, "total": total, "validator": _validator(response.headers)})
            bar = progress(total, offset) if progress else None
            dropped = None
            try:
                with open(part, mode) as f:
                    while True:
                        try:
                            chunk = response.read(CHUNK_BYTES)
                        except (http.client.HTTPException, socket.timeout, OSError) as exc:
                            dropped = exc
                            break
                        if not chunk:
                            break
                        f.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                if bar is not None:
                    bar.close()
        size = _size(part)
        if total is None and dropped is None:
            return part
        if total is not None and size == total:
            return part
        if total is not None and size > total:
            discard_part(path)
            raise DownloadError(f"{url}: the server sent {size} bytes but announced {total}; the partial file was removed")
        if attempt < attempts:
            of = f" of {total}" if total is not None else ""
            log(f"  the connection dropped at {size}{of} bytes; resuming ({attempt + 1} of {attempts})")
            time.sleep(retry_wait)
    of = f" of {total}" if total is not None else ""
    raise DownloadError(
        f"{url}: the download stopped at {_size(part)}{of} bytes after {attempts} attempts; the partial file is "
        f"kept at {part}: run the same command again to resume it"
    )
