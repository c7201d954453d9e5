"""The reward server (``rm/server.py``, ``rm/serve_reward.py``): its scores against the reward
model's own forward on ids encoded here, batching of concurrent clients, every refused request,
a failing and a stopped backend, the chat template, the entry point (bound URL, SIGTERM, bad
arguments) and a PPO run scored by the served model against one scoring in process."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import paddle
import pytest

from ppo.args import ServeRewardArgs
from ppo.core.errors import UserError
from ppo.data.tokenizer_utils import decode_without_special
from ppo.models import load_score_model, load_tokenizer
from ppo.rewards.remote import check_reachable, post_batch
from rm.server import RewardService, make_server
from test_ppo_rewards import arith, arith_sft, make_trainer  # noqa: F401  (the fixtures)
from trained_weights import assert_trained_weights_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is 3 + 4?", "Compute 12 - 5.", "What is 1 + 1?", "Compute 9 + 9."]
RESPONSES = ["7", "the answer is 7", "2", ""]


class Served:
    """A RewardService behind its HTTP server on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, **kwargs):
        self.args = ServeRewardArgs(port=0, **kwargs)
        self.args.validate()
        self.service = RewardService(self.args)
        self.httpd = make_server(self.service, "127.0.0.1", 0, self.args.max_request_bytes, timeout=5.0)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read() or b"null")
        finally:
            conn.close()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.close()


@pytest.fixture(scope="module")
def served(arith):
    server = Served(model_name_or_path=arith["rm"], max_length=32, max_batch_size=4, max_wait_ms=100.0)
    yield server
    server.close()


def own_ids(tok, prompt, response, ended, max_length=32):
    """The ids a reward model scores, written out here: the prompt with its special tokens, a space
    and the response without them, the eos when it ended, the last max_length kept."""
    ids = tok(prompt)["input_ids"] + tok(" " + response.strip(), add_special_tokens=False)["input_ids"]
    return (ids + [tok.eos_token_id] * ended)[-max_length:]


@pytest.fixture(scope="module")
def in_process(arith):
    model = load_score_model(arith["rm"], trained_head=True)
    model.eval()

    def score(ids):
        with paddle.no_grad():  # one row alone: no padding at all
            out = model(paddle.to_tensor([ids]), paddle.ones([1, len(ids)], dtype="int64"))
        return float(out.end_scores.squeeze())

    return score


def test_scores_equal_the_reward_models_own(served, in_process, arith):
    tok = arith["tokenizer"]
    ended = [True, False, True, False]
    scores = post_batch(served.url, PROMPTS, RESPONSES, [None] * 4, ended=ended)
    expected = [in_process(own_ids(tok, p, r, e)) for p, r, e in zip(PROMPTS, RESPONSES, ended)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    # the eos of an ended response is scored: the same text scores differently
    assert abs(post_batch(served.url, PROMPTS[:1], RESPONSES[:1], [None], ended=[False])[0] - scores[0]) > 1e-4
    # a prompt longer than max_length keeps its last ids, as the PPO rollout's re-encoding does
    long_prompt = " ".join(["What is 3 + 4?"] * 8)
    assert post_batch(served.url, [long_prompt], ["7"], [None])[0] == pytest.approx(
        in_process(own_ids(tok, long_prompt, "7", False)), abs=1e-5)


def test_actor_ids_decoded_and_served_score_as_in_process(served, in_process, arith):
    """What a PPO run sends: its rows decoded without special tokens plus 'ended'; the served score
    is the in-process reward model's on the actor's own ids (the same tokenizer)."""
    tok = arith["tokenizer"]
    rows = []  # the task's own phrasing: its words are in the tokenizer (unknown words decode as <unk>)
    for p, r in zip(PROMPTS[:3], ["7", "12", "0 1"]):
        prompt = f"BEGINNING OF CONVERSATION: USER: {p} ASSISTANT:"
        rows.append((tok(prompt)["input_ids"], tok(" " + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    texts = decode_without_special(tok, [p for p, _ in rows] + [r for _, r in rows])
    scores = post_batch(served.url, texts[:3], texts[3:], [None] * 3, ended=[True] * 3)
    np.testing.assert_allclose(scores, [in_process(p + r) for p, r in rows], atol=1e-5)


def test_empty_batch_and_the_start_up_check(served):
    assert post_batch(served.url, [], [], []) == []
    check_reachable(served.url, retries=0)


def test_concurrent_clients_are_batched_without_changing_scores(arith, served):
    alone = Served(model_name_or_path=arith["rm"], max_length=32, max_batch_size=1, max_wait_ms=0.0)
    try:
        # 1, 2 or 3 rows each: fewer than max_batch_size 4, so a forward waits for other requests' rows
        requests = [((PROMPTS[i % 4:] + PROMPTS[:i % 4])[:1 + i % 3], (RESPONSES[::-1] if i % 2 else RESPONSES)[:1 + i % 3])
                    for i in range(12)]
        expected = [post_batch(alone.url, p, r, [None] * len(r)) for p, r in requests]
    finally:
        alone.close()
    before = served.service.health()
    results, errors = [None] * len(requests), []

    def client(i):
        try:
            results[i] = post_batch(served.url, *requests[i], [None] * len(requests[i][1]), retries=0)
        except Exception as e:  # recorded for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    after = served.service.health()
    assert after["rows"] - before["rows"] == 24
    forwards = after["forwards"] - before["forwards"]
    assert forwards >= 6  # max_batch_size 4: at least 24 / 4 forwards
    assert forwards < 12  # and rows of different requests shared forwards (a request alone is one)


BAD_BODIES = [
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON list"),
    (b'{"prompts": ["a"]}', 400, "'responses' must be a list"),
    (b'{"prompts": ["a"], "responses": ["b"], "score": 1}', 400, "unknown request key 'score'"),
    (b'{"prompts": ["a", "b"], "responses": ["b"]}', 400, "'prompts' must be a list of 1"),
    (b'{"prompts": ["a"], "responses": [3]}', 400, "'responses': entry 0 is int"),
    (b'{"prompts": ["a"], "responses": ["b"], "references": [1]}', 400, "'references': entry 0"),
    (b'{"prompts": ["a"], "responses": ["b"], "ended": ["yes"]}', 400, "'ended': entry 0 is str"),
    (b'{"prompts": ["a"], "responses": ["b"], "ended": true}', 400, "'ended' must be a list"),
    (b"[" * 200000 + b"]" * 200000, 400, "nests too deeply"),  # crafted: would exhaust the parser's stack
]


@pytest.mark.parametrize("body,status,message", BAD_BODIES)
def test_malformed_requests_get_one_line(served, body, status, message):
    got, answer = served.raw("POST", "/score", body, {"Content-Type": "application/json"})
    assert got == status and message in answer["error"] and "\n" not in answer["error"], answer


def test_refused_requests(arith, served):
    status, answer = served.raw("GET", "/nowhere")
    assert status == 404 and "POST /score" in answer["error"]
    assert served.raw("POST", "/other", b"{}")[0] == 404
    assert served.raw("GET", "/score")[0] == 405
    # a body over max_request_bytes is refused from its length, before it is read
    small = Served(model_name_or_path=arith["rm"], max_length=32, max_request_bytes=64, max_rows_per_request=2)
    try:
        body = json.dumps({"prompts": ["x" * 80], "responses": ["y"]}).encode()
        status, answer = small.raw("POST", "/score", body)
        assert status == 413 and "max_request_bytes" in answer["error"]
        status, answer = small.raw("POST", "/score", b'{"prompts":["a","b","c"],"responses":["","",""]}')
        assert status == 413 and "max_rows_per_request" in answer["error"]
        with pytest.raises(UserError, match="status 413"):
            post_batch(small.url, ["x" * 80], ["y"], [None], retries=0)
    finally:
        small.close()
    # no Content-Length
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.putrequest("POST", "/score")
    conn.endheaders()
    answer = conn.getresponse()
    assert answer.status == 411
    conn.close()
    # a body shorter than its Content-Length: the read times out, the server answers the next client
    import socket

    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prom")
        s.shutdown(socket.SHUT_WR)
        assert b"400" in s.recv(4096).split(b"\r\n")[0]
    status, health = served.raw("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == arith["rm"]


def test_a_failing_and_a_stopped_backend(arith):
    server = Served(model_name_or_path=arith["rm"], max_length=32)
    try:
        model = server.service.model
        forward = model.forward
        model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost\nsecond line"))
        status, answer = server.raw("POST", "/score", json.dumps({"prompts": ["a"], "responses": ["b"]}).encode())
        assert status == 500 and answer["error"] == "scoring failed: RuntimeError: device lost"
        with pytest.raises(UserError, match="failed 2 time"):  # 5xx is retried, then one line
            post_batch(server.url, ["a"], ["b"], [None], retries=1, backoff=0.01)
        model.forward = forward  # the worker went on: the next request is scored
        assert len(post_batch(server.url, ["a"], ["b"], [None])) == 1
        assert server.service.health()["failures"] == 3
        server.service.close()  # the worker stops: health and scoring say so
        status, health = server.raw("GET", "/health")
        assert status == 503 and health["status"] == "stopped"
        status, answer = server.raw("POST", "/score", json.dumps({"prompts": ["a"], "responses": ["b"]}).encode())
        assert status == 503 and "restart" in answer["error"]
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_functions_with_the_model_and_alone(arith, served):
    both = Served(model_name_or_path=arith["rm"], max_length=32, reward_functions="math_exact:2",
                  reward_model_weight=0.5)
    alone = Served(tokenizer_name_or_path=arith["rm"], reward_functions="math_exact")
    try:
        prompts, responses, refs = PROMPTS[:2], ["7", "6"], ["7", "7"]
        rm = post_batch(served.url, prompts, responses, [None, None])
        exact = post_batch(alone.url, prompts, responses, refs)
        assert exact == [1.0, 0.0]
        np.testing.assert_allclose(post_batch(both.url, prompts, responses, refs),
                                   [0.5 * rm[0] + 2.0, 0.5 * rm[1]], atol=1e-5)
        assert alone.raw("GET", "/health")[1]["model"] is None
    finally:
        both.close()
        alone.close()


def test_chat_template_renders_each_row(arith, in_process, tmp_path):
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(arith["rm"], folder)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    server = Served(model_name_or_path=str(folder), max_length=32, chat_template=True)
    try:
        tok = load_tokenizer(str(folder))
        score = post_batch(server.url, PROMPTS[:1], ["7"], [None])[0]
        text = f"user: {PROMPTS[0]}\nassistant: 7\n"
        assert score == pytest.approx(in_process(tok(text, add_special_tokens=False)["input_ids"]), abs=1e-5)
    finally:
        server.close()
    with pytest.raises(UserError, match="has none"):
        RewardService(ServeRewardArgs(model_name_or_path=arith["rm"], chat_template=True))


def test_normalize_reward_uses_the_saved_statistics(arith, served, tmp_path):
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(arith["rm"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(normalizer_type="RunningMeanStd", norm_mean=0.25, norm_var=4.0, norm_count=100)
    (folder / "config.json").write_text(json.dumps(config))
    raw = post_batch(served.url, PROMPTS, RESPONSES, [None] * 4)
    for normalize, expected in ((True, (np.array(raw) - 0.25) / np.sqrt(4.0 + 1e-6)), (False, raw)):
        server = Served(model_name_or_path=str(folder), max_length=32, normalize_reward=normalize)
        try:
            np.testing.assert_allclose(post_batch(server.url, PROMPTS, RESPONSES, [None] * 4), expected, atol=1e-5)
        finally:
            server.close()


def serve(*argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "rm", "serve_reward.py"), *map(str, argv)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_entry_point_serves_and_stops_on_sigterm(arith):
    proc = serve(arith["rm"], "--port", "0", "--max_length", "32")
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving reward model ") and "/score" in line, (line, proc.stderr.read())
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        assert len(post_batch(url, PROMPTS, RESPONSES, [None] * 4)) == 4
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "reward server stopped" in out, err


def test_bad_arguments_are_one_line(arith, tmp_path, capsys):
    """Each bad argument through the entry point's main (in this process) and one through a real
    process: exit status 2 and one line on stderr, before anything is served."""
    import socket

    from ppo.stages.entry import run_entry
    from rm.serve_reward import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cases = [
            ([tmp_path / "missing"], "model_name_or_path"),
            ([arith["base"]], "model_name_or_path"),  # a causal LM: its score head would be new
            (["--port", "1"], "nothing to serve"),
            (["--reward_functions", "math_exact"], "tokenizer_name_or_path"),
            ([arith["rm"], "--reward_functions", "remote"], "cannot serve 'remote'"),
            ([arith["rm"], "--reward_functions", "nope"], "unknown reward function 'nope'"),
            ([arith["rm"], "--port", "70000"], "'port' must be in [0, 65535]"),
            ([arith["rm"], "--max_batch_size", "0"], "'max_batch_size' must be >= 1"),
            ([arith["rm"], "--max_wait_ms", "nan"], "'max_wait_ms' must be a finite number"),
            ([arith["rm"], "--device", "tpu"], "'device' must be cpu"),
            ([arith["rm"], "--prot", "1"], "unknown argument 'prot'"),
            ([arith["rm"], "--chat_template", "true"], "has none"),
            ([arith["rm"], "--port", str(port)], f"cannot bind 127.0.0.1:{port}"),
        ]
        for argv, message in cases:
            with pytest.raises(SystemExit) as exit_info:
                run_entry(main, [str(a) for a in argv])
            err = capsys.readouterr().err.strip()
            assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, (argv, err)
            assert message in err, (argv, err)
    proc = serve(tmp_path / "missing")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err


def test_ppo_against_the_served_model_equals_in_process(arith, arith_sft):
    """REINFORCE++ scored by the reward model in process and by the same model served: the same
    steps and the same trained weights.  The actor is the SFT model, whose answers are text: the
    served model reads the decoded text, which re-encodes to the actor's ids (an untrained actor's
    token soup need not).  Greedy: the in-process run's model loading draws random numbers."""
    server = Served(model_name_or_path=arith["rm"], max_length=32)
    try:
        common = dict(actor_model_name_or_path=arith_sft, reward_functions="", max_steps=2,
                      adv_estimator="reinforce_plus_plus", num_return_sequences=1, per_device_prompt_batch_size=8,
                      do_sample=False)  # loading the reward model draws from the generator: sampling would differ
        local = make_trainer(arith, "rm-local", reward_model_name_or_path=arith["rm"], **common)
        local.train()
        remote = make_trainer(arith, "rm-served", reward_server_url=server.url, **common)
        remote.train()
    finally:
        server.close()

    def steps(trainer):
        with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["split"] == "train"]

    a, b = steps(local), steps(remote)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["response_length"] == y["response_length"]
        for key in ("reward", "actor_loss", "kl"):
            assert abs(x[key] - y[key]) < 1e-4 * max(1.0, abs(x[key])), (key, x[key], y[key])
        assert y["reward_remote"] == pytest.approx(y["reward"], abs=1e-6)
    assert_trained_weights_match(os.path.join(local.args.output_dir, "policy"),
                                 os.path.join(remote.args.output_dir, "policy"), lr=1e-3, steps=2)
