"""HTTPReward against a real server on 127.0.0.1: rewards, retries on 503, a server that is down,
replies that break the protocol, timeouts, and credentials kept out of messages."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from rlhf.errors import UserError
from rlhf.rewards.http import HTTPReward, redact_url


class Server:
    """A reward server in a thread. `script`: what to do on each request, in order (the last
    entry repeats): "ok" (rewards = length of each response + the field "bonus"), an int
    status to fail with, "sleep" (answer after 2 s), or a callable(body) -> (status, bytes)."""

    def __init__(self, *script):
        self.script = list(script) or ["ok"]
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                step = server.script[min(len(server.requests), len(server.script)) - 1]
                if step == "sleep":
                    time.sleep(2)
                    step = "ok"
                if step == "ok":
                    rewards = [len(r) + f.get("bonus", 0) for r, f in zip(body["responses"], body["fields"])]
                    status, reply = 200, json.dumps({"rewards": rewards}).encode()
                elif callable(step):
                    status, reply = step(body)
                else:
                    status, reply = step, b"unavailable"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPTS, RESPONSES, FIELDS = ["p1", "p2", "p3"], ["a", "bbb", ""], [{}, {"bonus": 10}, {"bonus": 0.5}]


def test_the_rewards_come_back_in_order_and_the_request_has_the_protocol():
    with Server("ok") as server:
        rewards = HTTPReward(server.url, timeout_s=5, retries=0)(PROMPTS, RESPONSES, FIELDS)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 13.0, 0.5]
    assert server.requests == [{"prompts": PROMPTS, "responses": RESPONSES, "fields": FIELDS}]
    assert server.headers[0]["Content-Type"] == "application/json"


def test_two_503s_are_retried_and_the_third_attempt_succeeds():
    with Server(503, 503, "ok") as server:
        client = HTTPReward(server.url, timeout_s=5, retries=3, backoff_s=0.01)
        assert client(PROMPTS, RESPONSES, FIELDS).tolist() == [1.0, 13.0, 0.5]
    assert len(server.requests) == 3 and client.last_attempts == 3


def test_a_server_that_stays_at_503_stops_the_run_after_the_retries():
    with Server(503) as server:
        client = HTTPReward(server.url, timeout_s=5, retries=2, backoff_s=0.01)
        with pytest.raises(UserError, match=r"no answer after 3 attempt\(s\).*last: HTTP 503"):
            client(PROMPTS, RESPONSES, FIELDS)
    assert len(server.requests) == 3


def test_a_server_that_is_down_is_a_user_error_naming_the_url_fast_and_without_credentials():
    port = free_port()  # nothing listens there any more
    url = f"http://scorer:s3cret-pass@127.0.0.1:{port}/score?token=abcd1234&mode=x"
    client = HTTPReward(url, timeout_s=1, retries=2, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        client(PROMPTS, RESPONSES, FIELDS)
    assert time.monotonic() - started < 2  # 3 refused connections and 0.05 + 0.1 s of backoff
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}/score?token=***&mode=***" in message
    assert "attempt(s)" in message and "Connection refused" in message and "\n" not in message
    assert "s3cret" not in message and "abcd1234" not in message and "scorer" not in message
    assert client.last_attempts == 3


def test_credentials_in_the_url_are_sent_as_basic_auth():
    with Server("ok") as server:
        url = server.url.replace("http://", "http://scorer:s3cret@")
        HTTPReward(url, timeout_s=5, retries=0)(PROMPTS, RESPONSES, FIELDS)
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"scorer:s3cret").decode()


@pytest.mark.parametrize("reply, message", [
    ({"rewards": [1.0, 2.0]}, "2 rewards for 3 samples"),
    ({"rewards": [1.0, 2.0, 3.0, 4.0]}, "4 rewards for 3 samples"),
    ({"rewards": [1.0, "2", 3.0]}, 'reward 1 is "2", not a number'),
    ({"rewards": [1.0, None, 3.0]}, "reward 1 is null, not a number"),
    ({"rewards": [1.0, True, 3.0]}, "reward 1 is true, not a number"),
    ({"scores": [1.0, 2.0, 3.0]}, "no 'rewards' list"),
    ([1.0, 2.0, 3.0], "no 'rewards' list"),
    ("not json", "not JSON"),
])
def test_a_reply_that_breaks_the_protocol_is_a_user_error(reply, message):
    body = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
    with Server(lambda _: (200, body)) as server:
        client = HTTPReward(server.url, timeout_s=5, retries=3, backoff_s=0.01)
        with pytest.raises(UserError, match=message):
            client(PROMPTS, RESPONSES, FIELDS)
    assert len(server.requests) == 1  # not retried: the server would answer the same


def test_a_4xx_is_not_retried_and_its_body_is_shown():
    with Server(lambda _: (400, b'{"error": "field answer missing"}')) as server:
        with pytest.raises(UserError, match="HTTP 400 Bad Request.*field answer missing"):
            HTTPReward(server.url, timeout_s=5, retries=3, backoff_s=0.01)(PROMPTS, RESPONSES, FIELDS)
    assert len(server.requests) == 1


def test_the_timeout_is_honoured_and_retried():
    with Server("sleep", "sleep", "ok") as server:
        client = HTTPReward(server.url, timeout_s=0.3, retries=2, backoff_s=0.01)
        started = time.monotonic()
        assert client(PROMPTS, RESPONSES, FIELDS).tolist() == [1.0, 13.0, 0.5]
        assert time.monotonic() - started < 1.5  # two 0.3 s timeouts, not two 2 s waits
        assert client.last_attempts == 3
        client = HTTPReward(server.url, timeout_s=0.3, retries=1, backoff_s=0.01)
        server.script = ["sleep"]
        with pytest.raises(UserError, match="last: timed out after 0.3 s"):
            client(PROMPTS, RESPONSES, FIELDS)


def test_an_empty_batch_sends_nothing_and_a_bad_url_is_refused():
    with Server("ok") as server:
        assert HTTPReward(server.url)([], [], []).shape == (0,)
    assert server.requests == []
    with pytest.raises(UserError, match="http:// or https://"):
        HTTPReward("ftp://user:pw@host/x")


def test_redact_url():
    assert redact_url("https://u:p@example.com:8443/v1/score?key=abc&x=1#frag") == "https://example.com:8443/v1/score?key=***&x=***"
    assert redact_url("http://127.0.0.1:8000/score") == "http://127.0.0.1:8000/score"
