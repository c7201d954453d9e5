"""The remote reward endpoint client against a small HTTP server started on 127.0.0.1."""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ppo.core.errors import UserError
from ppo.rewards import RewardFunction, check_reachable, combine, post_batch


class Handler(BaseHTTPRequestHandler):
    """Behaviour by path: /ok scores each response by its length, the others break the protocol."""

    def do_POST(self):
        self.server.requests.append(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        scores = [float(len(r)) for r in body["responses"]]
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/flaky" and self.server.requests.count("/flaky") == 1:
            return self.answer(503, b"busy")
        answers = {"/malformed": b"<html>not json", "/count": json.dumps({"scores": scores + [1.0]}).encode(),
                   "/nan": json.dumps({"scores": [math.nan] * len(scores)}).encode(),
                   "/noscores": json.dumps({"score": scores}).encode()}
        if self.path == "/bad-request":
            return self.answer(400, b"missing field\nsecond line")
        self.answer(200, answers.get(self.path, json.dumps({"scores": scores}).encode()))

    def answer(self, status, data):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    httpd.requests, httpd.bodies = [], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAST = dict(timeout=0.3, retries=1, backoff=0.05)


def test_success_sends_the_batch(server):
    scores = post_batch(server.url + "/ok", ["p1", "p2"], ["abc", "de"], ["3", None], **FAST)
    assert scores == [3.0, 2.0]
    assert server.bodies == [{"prompts": ["p1", "p2"], "responses": ["abc", "de"], "references": ["3", None]}]
    check_reachable(server.url + "/ok", **FAST)
    assert server.bodies[-1] == {"prompts": [], "responses": [], "references": []}


def test_as_a_reward_function(server):
    fn = RewardFunction.load("remote", {"reward_server_url": server.url + "/ok", "reward_server_timeout": 2,
                                        "reward_server_retries": 0, "max_new_tokens": 5})
    scores = combine([(fn, 0.5)], ["a", "b"], ["xyz", "w"], [[1], [1]], [None, None])
    assert scores.per_function["remote"].tolist() == [3.0, 1.0] and scores.total.tolist() == [1.5, 0.5]


def test_retry_after_a_server_error(server):
    assert post_batch(server.url + "/flaky", ["p"], ["abcd"], [None], **FAST) == [4.0]
    assert server.requests == ["/flaky", "/flaky"]


def test_timeout_bounded(server):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"reward server .*/slow failed 2 time\(s\) \(last: no answer within 0.3 s\)"):
        post_batch(server.url + "/slow", ["p"], ["r"], [None], **FAST)
    assert time.monotonic() - start < 2.0  # 2 x 0.3 s timeouts + 0.05 s backoff, not the server's 1 s each
    assert server.requests == ["/slow", "/slow"]


@pytest.mark.parametrize("path, message", [
    ("/malformed", r"answered malformed JSON \('<html>not json'\); expected \{\"scores\""),
    ("/count", r"answered 3 scores for 2 responses"),
    ("/nan", r"answered score nan for response 0"),
    ("/noscores", r"without a 'scores' list"),
    ("/bad-request", r"answered status 400 \('missing field'\)"),
])
def test_protocol_errors_one_line_without_retry(server, path, message):
    with pytest.raises(UserError, match=message) as e:
        post_batch(server.url + path, ["p", "q"], ["r", "s"], [None, None], **FAST)
    assert "\n" not in str(e.value)
    assert server.requests == [path]  # a broken answer is not retried


def test_server_down_at_start():
    url = f"http://127.0.0.1:{free_port()}/score"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"reward server .* failed 2 time\(s\) \(last: ConnectionRefusedError"):
        check_reachable(url, **FAST)
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("options, message", [
    ({}, "reward function 'remote' needs reward_server_url"),
    ({"reward_server_url": "localhost:8000"}, "reward_server_url='localhost:8000' is not an http\\(s\\) URL"),
    ({"reward_server_url": "http://h", "reward_server_timeout": 0}, "reward_server_timeout=0 must be"),
    ({"reward_server_url": "http://h", "reward_server_retries": -1}, "reward_server_retries=-1 must be"),
])
def test_bad_settings(options, message):
    with pytest.raises(UserError, match=message):
        RewardFunction.load("remote", options)
