"""Remote model files: ``https://``, ``http://`` and ``hf://ORG/REPO/PATH[@REV]``, read by ranges.

``open_url(url)`` returns an ``HttpFile``, a ``formats.source.RangeReader``: the readers and the
scanner read it exactly as a local file, through ``pread`` and its block cache, so

- inspect of a safetensors file costs at most 2 requests (the first fetches ``FIRST`` bytes,
  which hold the 8-byte length and, nearly always, the whole header; a second only for a
  longer header);
- inspect or scan of a torch zip reads the end records, the central directory and the pickle
  members (the zip reader defers each storage's local header until its bytes are asked for);
- hash streams the whole file once (``RangeIO`` turns long sequential reads into one streamed
  response instead of a request per chunk).

The standard library's ``http.client`` does the HTTP, on purpose: sdtool needs GET with a
``Range`` header, redirects, a timeout and keep-alive, which it does in ~100 lines; httpx or
requests would add a runtime dependency (and its import time to every URL command) for nothing
more, and huggingface_hub is not needed to build a resolve URL. This module is imported only
when an argument is a URL, so ``sdtool --help``, ``scan`` and ``inspect`` of local files never
load it (a test checks).

``hf://ORG/REPO/PATH[@REV]`` (or ``hf://ORG/REPO@REV/PATH``; ``hf://datasets/...`` and
``hf://spaces/...`` too) means ``$HF_ENDPOINT/ORG/REPO/resolve/REV/PATH``, REV ``main`` by
default, HF_ENDPOINT ``https://huggingface.co``. The token (HF_TOKEN, HUGGING_FACE_HUB_TOKEN,
or huggingface_hub's token file) is sent only to huggingface.co hosts and the HF_ENDPOINT host,
never to a host a redirect leads to (the CDN's signed URLs need none).

Failures retry with exponential backoff (connection errors, timeouts, HTTP 429 and 5xx), then
end as one-line errors: 404 not found, 401/403 gated or private (set HF_TOKEN), a bad URL. A
server that ignores ranges (200 instead of 206) is read once into an unlinked temporary file,
capped at SDTOOL_REMOTE_SPOOL_MAX bytes, with a warning: the only local copy ever made.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urljoin, urlsplit

from sdtool.errors import FileAccessError, UsageError
from sdtool.formats.source import RangeReader
from sdtool.urls import UrlPath, as_path, is_url

log = logging.getLogger("sdtool.remote")

FIRST = 1 << 20  # bytes the first request asks for: the safetensors header, the zip's start
PIECE = 1 << 20  # bytes per read of a streamed response
HF_ENDPOINT = "https://huggingface.co"
RETRIED = {429, 500, 502, 503, 504}
REDIRECTS = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
#: seconds before the first retry; doubled each time (tests set it to 0)
BACKOFF = 0.5
MAX_BACKOFF = 8.0
MAX_RETRY_AFTER = 60.0  # the longest Retry-After waited for


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def timeout() -> float:
    """Seconds a connect or a read may take: ``SDTOOL_HTTP_TIMEOUT`` or 30."""
    return _env_number("SDTOOL_HTTP_TIMEOUT", 30.0)


def retries() -> int:
    """Attempts after the first: ``SDTOOL_HTTP_RETRIES`` or 4."""
    return int(_env_number("SDTOOL_HTTP_RETRIES", 4))


def spool_max() -> int:
    """The most bytes read from a server without range support: ``SDTOOL_REMOTE_SPOOL_MAX``."""
    return int(_env_number("SDTOOL_REMOTE_SPOOL_MAX", 64 << 30))


# -- names --------------------------------------------------------------------------------------

_REPO_TYPES = ("datasets", "spaces", "models")


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def resolve(url: str) -> str:
    """The https:// URL a URL names (``hf://`` mapped to its resolve URL). UsageError if bad."""
    if url.lower().startswith("hf://"):
        return _resolve_hf(url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError("not a URL sdtool reads (use https://HOST/PATH or hf://ORG/REPO/PATH)")
    return url


def _resolve_hf(url: str) -> str:
    rest = url[len("hf://") :].strip("/")
    segments = [s for s in rest.split("/") if s]
    prefix = ""
    if segments and segments[0] in _REPO_TYPES:
        kind = segments.pop(0)
        prefix = "" if kind == "models" else kind + "/"
    if len(segments) < 3:
        raise UsageError(
            "an hf:// URL names a file in a repo: hf://ORG/REPO/PATH[@REV] "
            "(e.g. hf://stabilityai/sdxl-turbo/sd_xl_turbo_1.0_fp16.safetensors)"
        )
    org, repo, path = segments[0], segments[1], segments[2:]
    rev = "main"
    if "@" in repo:  # huggingface_hub's spelling: hf://ORG/REPO@REV/PATH
        repo, rev = repo.split("@", 1)
    elif "@" in path[-1]:
        path[-1], rev = path[-1].rsplit("@", 1)
    if not (org and repo and rev and path[-1]):
        raise UsageError("an hf:// URL needs ORG, REPO, a file PATH and, after @, a revision")
    file = "/".join(quote(p) for p in path)
    return f"{hf_endpoint()}/{prefix}{org}/{repo}/resolve/{quote(rev, safe='')}/{file}"


def hf_token() -> str | None:
    """HF_TOKEN, HUGGING_FACE_HUB_TOKEN, or huggingface_hub's token file, if any."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if value := os.environ.get(name, "").strip():
            return value
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    token_file = os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")
    try:
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _token_host(netloc: str) -> bool:
    """Whether a request to ``netloc`` may carry the Hugging Face token."""
    host = netloc.rsplit("@", 1)[-1].split(":", 1)[0].lower()
    return (
        host == "huggingface.co"
        or host.endswith(".huggingface.co")
        or netloc.lower() == urlsplit(hf_endpoint()).netloc.lower()
    )


# -- HTTP ---------------------------------------------------------------------------------------


class _Retry(Exception):
    """A failure worth another try (the message says what it was); ``wait``: the server's
    Retry-After, in seconds, if it gave one."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class HttpFile(RangeReader):
    """A remote file read by HTTP range requests (see the module docstring)."""

    def __init__(self, url: str, *, first: int = FIRST) -> None:
        name = as_path(url)
        super().__init__(name if isinstance(name, UrlPath) else UrlPath(url), 0)
        self.url = url
        self.target = resolve(url)
        self.hf = url.lower().startswith("hf://") or _token_host(urlsplit(self.target).netloc)
        self.token = hf_token()
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._spool: BinaryIO | None = None
        self._start(first)

    # -- the first request ----------------------------------------------------------------------

    def _start(self, first: int) -> None:
        def first_response(resp: http.client.HTTPResponse) -> tuple[int, bytes | None]:
            if resp.status == 206:
                total = _total(resp.getheader("Content-Range"))
                if total is None:
                    raise FileAccessError(
                        "the server answered a range request without the file's size",
                        path=self.path,
                    )
                return total, _read_exactly(resp, min(first, total))
            if resp.status == 416:  # an empty file has no byte 0
                resp.read()
                return _total(resp.getheader("Content-Range")) or 0, b""
            if resp.status == 200:
                return -1, None  # the server ignores ranges: handled below, on this response
            raise self._status_error(resp)

        resp, result = self._request(f"bytes=0-{first - 1}", first_response, keep=True)
        size, body = result
        if size >= 0:
            assert body is not None
            resp.close()
            self.size = size
            self.requests += 1
            self.fetched += len(body)
            self.seed(0, body)
            return
        self._spool_from(resp)

    def _spool_from(self, resp: http.client.HTTPResponse) -> None:
        """The whole body of a 200 answer into an unlinked temporary file, under the cap."""
        length = resp.getheader("Content-Length")
        cap = spool_max()
        declared = int(length) if length and length.isdigit() else None
        if declared is not None and declared > cap:
            resp.close()
            raise FileAccessError(
                f"the server does not support range requests and the file has {declared} "
                f"bytes, more than SDTOOL_REMOTE_SPOOL_MAX ({cap}); download it first",
                path=self.path,
            )
        if declared is None or declared > FIRST:
            log.warning(
                "sdtool: warning: %s: the server does not support range requests; reading "
                "the whole file%s once into a temporary file",
                self.url,
                f" ({declared:,} bytes)" if declared is not None else "",
            )
        spool = tempfile.TemporaryFile(prefix="sdtool-remote-")  # noqa: SIM115 - closed in close
        self._spool = spool
        total = 0
        try:
            while piece := resp.read(PIECE):
                total += len(piece)
                if total > cap:
                    raise FileAccessError(
                        f"the server does not support range requests and the file is larger "
                        f"than SDTOOL_REMOTE_SPOOL_MAX ({cap} bytes); download it first",
                        path=self.path,
                    )
                spool.write(piece)
        except (OSError, http.client.HTTPException) as e:
            raise FileAccessError(
                f"the download broke off after {total} bytes ({_why(e)})", path=self.path
            ) from None
        finally:
            resp.close()
        if declared is not None and total != declared:
            raise FileAccessError(
                f"the server sent {total} of {declared} bytes; try again", path=self.path
            )
        spool.flush()
        self.size = total
        self.requests += 1
        self.fetched += total

    # -- reads ----------------------------------------------------------------------------------

    def _fetch(self, offset: int, n: int) -> bytes:
        if self._spool is not None:
            return os.pread(self._spool.fileno(), n, offset)

        def body(resp: http.client.HTTPResponse) -> bytes:
            if resp.status != 206:
                raise self._status_error(resp, ranged=True)
            if _start(resp.getheader("Content-Range")) != offset:
                resp.read()
                raise FileAccessError(
                    f"the server answered a request for bytes from {offset} with other bytes "
                    f"({resp.getheader('Content-Range')})",
                    path=self.path,
                )
            return _read_exactly(resp, n)

        return self._request(f"bytes={offset}-{offset + n - 1}", body)[1]

    def stream(self, offset: int = 0) -> Iterator[bytes]:
        """The bytes from ``offset`` to the end as one streamed response (resumed by a new
        range request if the connection breaks)."""
        pos = offset
        if self._spool is not None:
            while pos < self.size:
                piece = os.pread(self._spool.fileno(), min(PIECE, self.size - pos), pos)
                if not piece:
                    return
                pos += len(piece)
                yield piece
            return
        tries = 0
        while pos < self.size:

            def opened(resp: http.client.HTTPResponse) -> None:
                if resp.status != 206:
                    raise self._status_error(resp, ranged=True)

            resp, _ = self._request(f"bytes={pos}-", opened, keep=True)
            self.requests += 1
            try:
                while pos < self.size:
                    piece = resp.read(min(PIECE, self.size - pos))
                    if not piece:
                        raise http.client.IncompleteRead(b"")
                    pos += len(piece)
                    self.fetched += len(piece)
                    yield piece
            except (OSError, http.client.HTTPException) as e:
                self._drop(self.target)
                tries += 1
                if tries > retries():
                    raise FileAccessError(
                        f"the download broke off at byte {pos} ({_why(e)}) after {tries} tries",
                        path=self.path,
                    ) from None
                _sleep(tries)
            finally:
                resp.close()
                if pos < self.size:  # stopped early: the connection holds unread bytes
                    self._drop(self.target)

    def close(self) -> None:
        super().close()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # -- one request, with redirects and retries ------------------------------------------------

    def _request(self, byte_range: str, handle: Any, *, keep: bool = False) -> tuple[Any, Any]:
        """GET ``self.target`` with ``Range: byte_range``; ``handle(response)`` checks the
        status and reads the body. Returns (response, what handle returned). Retries
        connection errors, timeouts and 429/5xx answers with exponential backoff."""
        attempt = 0
        while True:
            try:
                resp = self._get(byte_range)
                if resp.status in RETRIED:
                    resp.read()
                    after = resp.getheader("Retry-After") or ""
                    wait = float(after) if after.strip().isdigit() else None
                    raise _Retry(f"HTTP {resp.status} {resp.reason}".strip(), wait)
                try:
                    result = handle(resp)
                finally:
                    if not keep:
                        resp.close()
                return resp, result
            except (_Retry, OSError, http.client.HTTPException) as e:
                self._drop(self.target)
                attempt += 1
                if attempt > retries():
                    raise self._gave_up(e, attempt) from None
                _sleep(attempt, e.wait if isinstance(e, _Retry) else None)

    def _get(self, byte_range: str) -> http.client.HTTPResponse:
        url = self.target
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            conn = self._conn(parts.scheme.lower(), parts.netloc)
            headers = {"Range": byte_range, "User-Agent": _agent(), "Accept-Encoding": "identity"}
            if self.token and _token_host(parts.netloc):
                headers["Authorization"] = f"Bearer {self.token}"
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if getattr(conn, "via_proxy", False):  # a plain-HTTP proxy takes the whole URL
                target = f"{parts.scheme}://{parts.netloc}{target}"
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            if resp.status not in REDIRECTS:
                if url != self.target and resp.status == 206:
                    self.target = url  # later ranges go straight to where the file is
                return resp
            location = resp.getheader("Location")
            resp.read()
            if not location:
                raise FileAccessError(
                    f"HTTP {resp.status} redirect without a Location", path=self.path
                )
            url = urljoin(url, location)
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise FileAccessError(f"redirected to a non-HTTP URL ({url})", path=self.path)
        raise FileAccessError(f"more than {MAX_REDIRECTS} redirects", path=self.path)

    def _conn(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        conn = self._conns.get(key)
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            proxy = _proxy(scheme, netloc)
            if proxy is None:
                conn = cls(netloc, timeout=timeout())
            elif scheme == "https":  # a CONNECT tunnel through the proxy
                conn = cls(proxy, timeout=timeout())
                conn.set_tunnel(netloc)
            else:
                conn = http.client.HTTPConnection(proxy, timeout=timeout())
                conn.via_proxy = True  # type: ignore[attr-defined]
            self._conns[key] = conn
        return conn

    def _drop(self, url: str) -> None:
        """Close every connection (after an error a kept-alive one may be half-read)."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- errors ---------------------------------------------------------------------------------

    def _status_error(
        self, resp: http.client.HTTPResponse, *, ranged: bool = False
    ) -> FileAccessError:
        status = resp.status
        resp.read()
        if status == 404:
            what = "the repo, the file path and the revision" if self.hf else "the URL"
            msg = f"not found (HTTP 404); check {what}"
        elif status in (401, 403):
            if self.hf and not self.token:
                msg = (
                    f"access denied (HTTP {status}): a gated or private repo; accept its terms "
                    "on huggingface.co and set HF_TOKEN to a token that may read it"
                )
            elif self.hf:
                msg = (
                    f"access denied (HTTP {status}): the token in HF_TOKEN may not read this "
                    "repo (gated: accept its terms on huggingface.co; private: check the token)"
                )
            else:
                msg = f"access denied (HTTP {status})"
        elif ranged and status == 200:
            msg = "the server stopped honouring range requests midway; try again"
        else:
            msg = f"the server answered HTTP {status} {resp.reason}".rstrip()
        return FileAccessError(msg, path=self.path)

    def _gave_up(self, e: BaseException, attempts: int) -> FileAccessError:
        tries = f"{attempts} tries" if attempts > 1 else "1 try"
        if isinstance(e, TimeoutError):
            why = f"timed out after {timeout():g} s (SDTOOL_HTTP_TIMEOUT)"
        else:
            why = _why(e)
        host = urlsplit(self.target).netloc
        return FileAccessError(f"cannot read from {host}: {why}, {tries}", path=self.path)


def _proxy(scheme: str, netloc: str) -> str | None:
    """The proxy (host:port) for ``scheme`` from HTTPS_PROXY / HTTP_PROXY, unless NO_PROXY
    names the host; None for a direct connection."""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    host = netloc.rsplit("@", 1)[-1]
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    if not url or bypass(host.split(":", 1)[0], proxies):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "") or not parts.hostname:
        return None  # an https:// or socks proxy: not spoken here, connect directly
    return f"{parts.hostname}:{parts.port or 80}"


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    text = str(e) or type(e).__name__
    return re.sub(r"\s+", " ", text)[:200]


def _sleep(attempt: int, asked: float | None = None) -> None:
    """Exponential backoff; a server's Retry-After is honoured up to MAX_RETRY_AFTER."""
    delay = min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1))
    if asked is not None and BACKOFF > 0:
        delay = max(delay, min(asked, MAX_RETRY_AFTER))
    time.sleep(delay)


def _start(content_range: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(m.group(1)) if m else None


def _total(content_range: str | None) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", content_range or "")
    return int(m.group(1)) if m else None


def _read_exactly(resp: http.client.HTTPResponse, n: int) -> bytes:
    data = resp.read(n)
    if len(data) != n:
        raise http.client.IncompleteRead(data, n - len(data))
    return data


def _agent() -> str:
    from sdtool import __version__

    return f"sdtool/{__version__}"


def open_url(url: str | Path) -> HttpFile:
    """Open a remote file for reading by ranges (one request made already: see FIRST).

    Raises:
        UsageError for a URL sdtool cannot read; FileAccessError (one line) when the file is
        not found, access is denied, or the server cannot be reached after the retries.

    Example:
        >>> with open_url("hf://org/repo/model.safetensors@v1.0") as r:
        ...     r.size, r.pread(0, 8)
    """
    text = str(url)
    if not is_url(text):
        raise UsageError(f"{text!r} is not a URL (https://, http:// or hf://)")
    return HttpFile(text)
