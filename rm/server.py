"""The reward server: a trained reward model (and/or reward functions) behind the endpoint protocol
the PPO client speaks (``ppo/rewards/remote.py``).

    POST /score   {"prompts": [str], "responses": [str], "references": [str|null], "ended": [bool]}
                  -> 200 {"scores": [float]}          ("references" and "ended" optional)
    GET  /health  -> 200 {"status": "ok", ...counters}  (503 when the scoring worker has stopped)

Each row is encoded as the PPO rollout re-encodes for a reward model with another vocabulary
(``encode_scored_text``: the prompt, a space, the response, the eos when it ``ended``, the last
``max_length`` ids), or through the tokenizer's chat template with ``chat_template``.  One worker
thread owns the model: the rows of every waiting request join one queue, and each forward takes up
to ``max_batch_size`` rows, waiting at most ``max_wait_ms`` for more.  Every row's score is its own
(position ids come from the mask), so batching does not change it beyond float rounding.

A malformed request is answered 400 with ``{"error": one line}``, a body without a length 411, a
body over ``max_request_bytes`` or with more than ``max_rows_per_request`` rows 413 (before it is
read), another path 404, a scoring failure 500 (the worker goes on with the next batch).
"""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import paddle

from ppo.core.errors import UserError
from ppo.data.chat import ChatRenderer, load_chat_template
from ppo.data.tokenizer_utils import encode_scored_text
from ppo.models import freeze, load_score_model, load_tokenizer
from ppo.rewards import build_reward_functions, combine, parse_reward_functions, run_options

KEYS = ("prompts", "responses", "references", "ended")


class RequestError(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_request(body: bytes, max_rows: int) -> dict:
    """The request's four lists (``references`` None and ``ended`` False where not sent), or a
    RequestError naming what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8; expected a JSON object") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                                'expected {"prompts": [...], "responses": [...]}') from None
    except RecursionError:  # a crafted body of deeply nested lists
        raise RequestError(400, "request body nests too deeply; expected an object of flat lists") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body is a JSON {type(data).__name__}; expected an object with "
                                "'prompts' and 'responses' lists")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise RequestError(400, f"unknown request key {unknown[0]!r}; accepted: {', '.join(KEYS)}")
    for key in ("prompts", "responses"):
        if not isinstance(data.get(key), list):
            raise RequestError(400, f"request key {key!r} must be a list of strings")
    B = len(data["responses"])
    if B > max_rows:
        raise RequestError(413, f"request holds {B} responses; this server takes at most {max_rows} per request "
                                "(max_rows_per_request)")
    out = {"prompts": data["prompts"], "responses": data["responses"],
           "references": data.get("references", [None] * B), "ended": data.get("ended", [False] * B)}
    for key, ok, what in (("prompts", lambda v: isinstance(v, str), "a string"),
                          ("responses", lambda v: isinstance(v, str), "a string"),
                          ("references", lambda v: v is None or isinstance(v, str), "a string or null"),
                          ("ended", lambda v: isinstance(v, bool), "true or false")):
        values = out[key]
        if not isinstance(values, list) or len(values) != B:
            raise RequestError(400, f"request key {key!r} must be a list of {B} entries (one per response), got "
                                    f"{len(values) if isinstance(values, list) else type(values).__name__}")
        bad = next((i for i, v in enumerate(values) if not ok(v)), None)
        if bad is not None:
            raise RequestError(400, f"request key {key!r}: entry {bad} is {type(values[bad]).__name__}; "
                                    f"expected {what}")
    return out


class RewardService:
    """What the server serves: the frozen reward model behind one batching worker thread, and the
    reward functions.  ``score(request) -> [B] float`` is safe to call from many threads."""

    def __init__(self, args):
        self.args = args
        spec = args.reward_functions
        if "remote" in [s.name for s in parse_reward_functions(spec)]:
            raise UserError("reward_functions: the server cannot serve 'remote' (it would call a server itself); "
                            "name the functions it should compute")
        self.functions = build_reward_functions(spec, run_options(args))
        tokenizer_path = args.tokenizer_name_or_path or args.model_name_or_path
        what = "tokenizer_name_or_path" if args.tokenizer_name_or_path else "model_name_or_path"
        self.tokenizer = load_tokenizer(tokenizer_path, what)
        self.renderer = ChatRenderer(load_chat_template(tokenizer_path, what)) if args.chat_template else None
        self.model = None
        if args.model_name_or_path:
            self.model = freeze(load_score_model(args.model_name_or_path, trained_head=True))
        self.stats = {"requests": 0, "rows": 0, "forwards": 0, "failures": 0}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker = None
        if self.model is not None:
            self._worker = threading.Thread(target=self._run, name="reward-model", daemon=True)
            self._worker.start()

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, prompt: str, response: str, ended: bool) -> list[int]:
        """The ids the reward model scores for one row (see the module docstring)."""
        if self.renderer is None:
            return encode_scored_text(self.tokenizer, prompt, response, ended, self.args.max_length)
        text = self.renderer.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                    False, self.tokenizer)
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]][-self.args.max_length:]

    # -- scoring --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._worker is None or (self._worker.is_alive() and not self._stop.is_set())

    def score(self, request: dict) -> list[float]:
        prompts, responses, refs, ended = (request[k] for k in KEYS)
        B = len(responses)
        total = np.zeros(B, dtype=np.float64)
        if B and self.model is not None:
            if not self.alive:
                raise RequestError(503, "the reward model's worker has stopped; restart the server")
            rows = [self.encode(p, r, e) for p, r, e in zip(prompts, responses, ended)]
            future: Future = Future()
            self._queue.put((rows, future))
            total += self.args.reward_model_weight * self._wait(future)
        if B and self.functions:
            ids = [[int(t) for t in self.tokenizer(" " + r.strip(), add_special_tokens=False)["input_ids"]]
                   + ([self.tokenizer.eos_token_id] if e else []) for r, e in zip(responses, ended)]
            total += combine(self.functions, prompts, responses, ids, refs, max_new_tokens=self.args.max_new_tokens,
                             eos_token_id=self.tokenizer.eos_token_id).total
        with self._lock:
            self.stats["requests"] += 1
            self.stats["rows"] += B
        return [float(s) for s in total]

    def _wait(self, future: Future) -> np.ndarray:
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:
                if not self._worker.is_alive():
                    raise RequestError(503, "the reward model's worker has stopped; restart the server") from None

    def _take(self) -> list:
        """Jobs for one round: the first waiting one, then whatever arrives within max_wait_ms while
        the rows number fewer than max_batch_size."""
        jobs = [self._queue.get()]
        if jobs[0] is None:
            return []
        rows = len(jobs[0][0])
        deadline = time.monotonic() + self.args.max_wait_ms / 1000.0
        while rows < self.args.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stop.set()
                break
            jobs.append(job)
            rows += len(job[0])
        return jobs

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take()
            if not jobs:
                break
            rows = [row for job_rows, _ in jobs for row in job_rows]
            try:
                scores = self.forward(rows)
            except Exception as e:  # the failure is each waiting request's; the worker goes on
                with self._lock:
                    self.stats["failures"] += 1
                for _, future in jobs:
                    future.set_exception(e)
                continue
            start = 0
            for job_rows, future in jobs:
                future.set_result(scores[start:start + len(job_rows)])
                start += len(job_rows)
        self._stop.set()
        while not self._queue.empty():  # requests that came in as it stopped
            job = self._queue.get_nowait()
            if job is not None:
                job[1].set_exception(RequestError(503, "the server is shutting down"))

    @paddle.no_grad()
    def forward(self, rows: list[list[int]]) -> np.ndarray:
        """End scores [len(rows)] float64 of right-padded chunks of at most ``max_batch_size`` rows."""
        out = []
        pad = self.tokenizer.pad_token_id
        size = self.args.max_batch_size
        for start in range(0, len(rows), size):
            chunk = [r if r else [pad] for r in rows[start:start + size]]
            T = max(len(r) for r in chunk)
            ids = paddle.to_tensor([r + [pad] * (T - len(r)) for r in chunk], dtype="int64")
            mask = paddle.to_tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk], dtype="int64")
            scores = self.model(ids, mask).end_scores.squeeze(-1)
            if self.args.normalize_reward:
                scores = self.model.normalizer.normalize(scores)
            out.append(scores.astype("float32").numpy().astype(np.float64))
            with self._lock:
                self.stats["forwards"] += 1
        return np.concatenate(out) if out else np.zeros(0)

    def close(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout=30)
        self._stop.set()

    def health(self) -> dict:
        with self._lock:
            stats = dict(self.stats)
        return {"status": "ok" if self.alive else "stopped", "model": self.args.model_name_or_path or None,
                "functions": [type(f).NAME for f, _ in self.functions], "max_batch_size": self.args.max_batch_size,
                "max_length": self.args.max_length, **stats}


def make_server(service: RewardService, host: str, port: int, max_request_bytes: int,
                timeout: float = 30.0) -> http.server.ThreadingHTTPServer:
    """An HTTP server (one thread per connection) answering ``/score`` and ``/health`` with
    ``service``; not started (``serve_forever``).  ``timeout``: seconds a client may take to send
    its request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            self.request.settimeout(timeout)
            super().setup()

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._answer(status, {"error": message})

        def do_GET(self):
            if self.path.split("?")[0] == "/health":
                health = service.health()
                self._answer(200 if health["status"] == "ok" else 503, health)
            elif self.path.split("?")[0] == "/score":
                self._error(405, "POST a JSON batch to /score; GET /health for the server's state")
            else:
                self._error(404, f"no such path {self.path!r}; POST /score, GET /health")

        def do_POST(self):
            if self.path.split("?")[0] != "/score":
                self._error(404, f"no such path {self.path!r}; POST /score, GET /health")
                return
            length = self.headers.get("Content-Length")
            if length is None:
                self._error(411, "the request needs a Content-Length header")
                return
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                self._error(400, f"Content-Length {length!r} is not a byte count")
                return
            if n > max_request_bytes:
                self._error(413, f"request body of {n} bytes is over this server's {max_request_bytes} "
                                 "(max_request_bytes); send smaller batches")
                return
            try:
                body = self.rfile.read(n)
                if len(body) < n:
                    raise RequestError(400, f"request body ended after {len(body)} of {n} bytes")
                scores = service.score(parse_request(body, service.args.max_rows_per_request))
            except RequestError as e:
                self._error(e.status, e.message)
                return
            except (TimeoutError, OSError):
                self.close_connection = True
                return
            except Exception as e:  # a scoring failure: one line for the client, the server goes on
                line = (str(e).strip().splitlines() or [""])[0][:200]
                self._error(500, f"scoring failed: {type(e).__name__}: {line}")
                return
            self._answer(200, {"scores": scores})

        def log_message(self, format, *args):
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"cannot bind {host}:{port}: {e.strerror or e}; give another 'port' (0: any free one) "
                        "or 'host'") from None
    server.daemon_threads = True
    return server
