"""A remote reward endpoint: POST a JSON batch to ``reward_server_url``, read one score per response.

Protocol (HTTP/1.1, ``Content-Type: application/json``)::

    request:  {"prompts": [str, ...], "responses": [str, ...], "references": [str | null, ...],
               "ended": [bool, ...]}             ("ended" optional: the response stopped on the eos)
    answer:   {"scores": [float, ...]}          (status 200, one finite number per response)

The texts are decoded without special tokens, so ``ended`` says what the text cannot: that the
actor stopped on its own rather than at ``max_new_tokens``.  A reward model scores the two
differently (the in-process one sees the eos id), and this toolkit's server (``rm/serve_reward.py``)
appends the eos for a response that ended.  A server may ignore the key.

Each request waits at most ``timeout`` seconds.  Connection failures, timeouts and answers with
status 429 or 5xx are retried ``retries`` times, after ``backoff * 2**attempt`` seconds.  Other
statuses, malformed JSON, a wrong number of scores or non-finite scores are not retried: they are a
bug of the server, reported as one UserError.  Only the standard library is used.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ppo.core.errors import UserError
from ppo.rewards.base import RewardFunction

PROTOCOL = 'expected {"scores": [one finite number per response]}'


def check_url(url: Any) -> str:
    """``url`` if it is an http(s) URL with a host, else a UserError."""
    parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserError(f"reward_server_url={url!r} is not an http(s) URL; expected e.g. 'http://127.0.0.1:8000/score'")
    return url


def _first_line(text: str, limit: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


class _Retry(Exception):
    """A failure worth another attempt; ``reason`` says what happened."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _post(url: str, payload: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=payload, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.read()
    except urllib.error.HTTPError as e:
        body = _first_line(e.read().decode("utf-8", "replace"))
        if e.code == 429 or e.code >= 500:
            raise _Retry(f"status {e.code} {body!r}") from None
        raise UserError(f"reward server {url} answered status {e.code} ({body!r}); it must answer 200 with "
                        f"{PROTOCOL}") from None
    except (socket.timeout, TimeoutError):
        raise _Retry(f"no answer within {timeout:g} s") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Retry(f"no answer within {timeout:g} s") from None
        raise _Retry(f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)) \
            from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None


def post_batch(url: str, prompts: list[str], responses: list[str], references: list[str | None], *,
               ended: list[bool] | None = None, timeout: float = 60.0, retries: int = 2,
               backoff: float = 1.0) -> list[float]:
    """The server's scores for the batch: ``B`` floats, ``B = len(responses)``.

    ``ended`` (optional, one bool per response) is sent as the request's ``"ended"``.  Tries
    ``1 + retries`` times in all (see the module docstring for what is retried); a UserError
    when no attempt succeeds or the answer breaks the protocol.
    """
    B = len(responses)
    request = {"prompts": list(prompts), "responses": list(responses), "references": list(references)}
    if ended is not None:
        request["ended"] = [bool(e) for e in ended]
    payload = json.dumps(request).encode("utf-8")
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            body = _post(url, payload, timeout)
            break
        except _Retry as e:
            reason = e.reason
    else:
        raise UserError(f"reward server {url} failed {retries + 1} time(s) (last: {reason}); check that it runs "
                        "and reward_server_url, reward_server_timeout")
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"reward server {url} answered malformed JSON "
                        f"({_first_line(body.decode('utf-8', 'replace'))!r}); {PROTOCOL}") from None
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        raise UserError(f"reward server {url} answered {_first_line(json.dumps(answer))!r} without a 'scores' list; "
                        f"{PROTOCOL}")
    if len(scores) != B:
        raise UserError(f"reward server {url} answered {len(scores)} scores for {B} responses; {PROTOCOL}")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise UserError(f"reward server {url} answered score {s!r} for response {i}; {PROTOCOL}")
    return [float(s) for s in scores]


def check_reachable(url: str, timeout: float = 10.0, retries: int = 2, backoff: float = 1.0) -> None:
    """Start-up check: the server answers an empty batch with ``{"scores": []}``; else a UserError
    (before training starts rather than at the first rollout)."""
    post_batch(check_url(url), [], [], [], timeout=timeout, retries=retries, backoff=backoff)


class RemoteReward(RewardFunction):
    """The score of the server at ``reward_server_url`` (see this module's protocol), unchanged.

    ``reward_server_timeout`` seconds per request, ``reward_server_retries`` retries.
    """

    NAME = "remote"

    def __init__(self, reward_server_url: str = "", reward_server_timeout: float = 60.0,
                 reward_server_retries: int = 2, reward_server_backoff: float = 1.0):
        if not reward_server_url:
            raise UserError("reward function 'remote' needs reward_server_url, e.g. 'http://127.0.0.1:8000/score'")
        self.url = check_url(reward_server_url)
        if isinstance(reward_server_timeout, bool) or not isinstance(reward_server_timeout, (int, float)) \
                or not reward_server_timeout > 0:
            raise UserError(f"reward_server_timeout={reward_server_timeout!r} must be a number of seconds > 0")
        if isinstance(reward_server_retries, bool) or not isinstance(reward_server_retries, int) \
                or reward_server_retries < 0:
            raise UserError(f"reward_server_retries={reward_server_retries!r} must be an integer >= 0")
        self.timeout, self.retries, self.backoff = float(reward_server_timeout), reward_server_retries, \
            reward_server_backoff

    def __call__(self, prompts, responses, response_ids, references, **context):
        eos = context.get("eos_token_id")
        ended = None if eos is None else [bool(ids) and int(ids[-1]) == int(eos) for ids in response_ids]
        return post_batch(self.url, prompts, responses, references, ended=ended, timeout=self.timeout,
                          retries=self.retries, backoff=self.backoff)
