"""A client for a reward service: batches POSTed as JSON, one reward per sample back.

Request (POST, `Content-Type: application/json`):

    {"prompts": [str, ...], "responses": [str, ...], "fields": [{...}, ...]}

Reply (status 200): `{"rewards": [number, ...]}`, exactly one number per sample, in order.
Anything else (not JSON, no "rewards" list, another length, a value that is not a number) stops
the run with a `UserError`. Connection errors, timeouts, HTTP 5xx and 429 are retried `retries`
times with exponential backoff (`backoff_s`, doubled each time, at most `max_backoff_s`); then a
`UserError` names the URL and the last cause, in one line. Other 4xx answers are not retried.

`user:password@` in the URL is sent as HTTP basic authentication. Messages and logs show the URL
without it and with the values of its query string masked (`?key=***`), so a token in either
never reaches a log. `timeout_s` applies to connecting and to each read of the reply (the
server must start answering within it). Proxies follow the usual environment variables.

Standard library only (`urllib.request`): no extra dependency.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

import torch

from rlhf.errors import UserError

__all__ = ["HTTPReward", "redact_url"]


def redact_url(url: str) -> str:
    """`url` without user info and with its query values masked: safe to print."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{key}=***" for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if parts.query and not query:
        query = "***"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))


def _jsonable(value):
    """Field values JSON does not know: numpy scalars and arrays, dates, bytes, the rest as str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class HTTPReward:
    """Rewards from a service at `url` (see the module docstring for the protocol)."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, *, backoff_s: float = 0.5,
                 max_backoff_s: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        self.display_url = redact_url(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"reward service {self.display_url!r}: expected an http:// or https:// URL with a host")
        if retries < 0 or not timeout_s > 0:
            raise UserError(f"reward service {self.display_url}: need retries >= 0 and a timeout > 0")
        self.timeout_s, self.retries = float(timeout_s), int(retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "rlhf"}
        self._secrets = [value for _, value in urllib.parse.parse_qsl(parts.query) if len(value) >= 4]
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets += [s for s in (password, token, parts.password) if s]
        self._url = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                             parts.query, ""))
        self.last_attempts = 0
        """Attempts the last batch took (1 when the first succeeded)."""
        self.last_seconds = 0.0
        """Seconds the last batch took, retries and backoff included."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 fields: Sequence[dict] | None = None) -> torch.Tensor:
        """(batch,) float32: the service's reward for each sample."""
        n = len(prompts)
        fields = [{} for _ in range(n)] if fields is None else list(fields)
        if len(responses) != n or len(fields) != n:
            raise ValueError(f"{n} prompts, {len(responses)} responses and {len(fields)} fields")
        if n == 0:
            return torch.zeros(0)
        body = json.dumps({"prompts": list(prompts), "responses": list(responses), "fields": fields},
                          default=_jsonable).encode()
        started, last = time.monotonic(), ""
        for attempt in range(1 + self.retries):
            if attempt:
                time.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            self.last_attempts = attempt + 1
            request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as error:
                detail = self._excerpt(error)
                error.close()
                if error.code >= 500 or error.code == 429:
                    last = f"HTTP {error.code} {error.reason}{detail}"
                    continue
                self.last_seconds = time.monotonic() - started
                raise UserError(self._scrub(f"reward service {self.display_url}: HTTP {error.code} "
                                            f"{error.reason}{detail}")) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                last = self._cause(error)
                continue
            self.last_seconds = time.monotonic() - started
            return self._rewards(raw, n)
        self.last_seconds = time.monotonic() - started
        raise UserError(self._scrub(f"reward service {self.display_url}: no answer after {1 + self.retries} "
                                    f"attempt(s) in {self.last_seconds:.1f} s; last: {last}"))

    def _rewards(self, raw: bytes, n: int) -> torch.Tensor:
        where = f"reward service {self.display_url}"
        try:
            data = json.loads(raw)
        except ValueError:
            raise UserError(self._scrub(f"{where}: the reply is not JSON: {self._short(raw)}")) from None
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list):
            raise UserError(self._scrub(f"{where}: the reply has no 'rewards' list: {self._short(raw)}"))
        if len(rewards) != n:
            raise UserError(f"{where}: {len(rewards)} rewards for {n} samples (expected one per sample)")
        for i, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(self._scrub(f"{where}: reward {i} is {json.dumps(value)[:80]}, not a number"))
        return torch.tensor(rewards, dtype=torch.float32)

    @staticmethod
    def _short(raw: bytes, limit: int = 200) -> str:
        text = " ".join(raw[: limit * 4].decode("utf-8", "replace").split())
        return repr(text if len(text) <= limit else text[:limit] + "...")

    def _excerpt(self, error: urllib.error.HTTPError) -> str:
        try:
            raw = error.read(4096)
        except Exception:
            return ""
        return f": {self._short(raw)}" if raw else ""

    def _cause(self, error: BaseException) -> str:
        reason = getattr(error, "reason", None) if isinstance(error, urllib.error.URLError) else None
        error = reason if isinstance(reason, BaseException) else error
        if isinstance(error, (socket.timeout, TimeoutError)):
            return f"timed out after {self.timeout_s:g} s"
        return " ".join(f"{type(error).__name__}: {error}".split())

    def _scrub(self, text: str) -> str:
        """`text` with any credential of the URL masked (a server might echo it back)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
