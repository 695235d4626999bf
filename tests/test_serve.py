"""`gpt2 serve` driven over loopback by real clients: urllib, the openai package and lm-evaluation-harness.

Each server is a `python -m gpt2cli serve --port 0` subprocess on a tiny synthetic model, bound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from conftest import REPO_ROOT
from synthetic import T, build_gguf

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install '.[serve]'")

from gpt2cli.gguf_file import ModelFile  # noqa: E402
from gpt2cli.model import GPT2Model  # noqa: E402
from gpt2cli.serve import Engine, Job, parse_completion_request  # noqa: E402

PROMPT = "Hello, I'm a language model"
START_SECONDS = 180  # a cold Numba cache compiles the kernels first
REQUEST_SECONDS = 60


class Server:
    """A `gpt2 serve` subprocess; its stderr lines are collected by a thread."""

    def __init__(self, model: Path, *args: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "gpt2cli", "serve", "--model", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        first = self.next_line(START_SECONDS)
        assert first.startswith("serving "), first
        self.url = first.split(" on ")[1].split()[0].removesuffix("/v1")
        assert self.url.startswith("http://127.0.0.1:")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # end of the stream

    def next_line(self, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        self.log.append(line)
        return line

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then (exit code, the rest of stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        while self.next_line(10) != "":
            pass
        return code, "\n".join(self.log).strip()


def call(
    url: str, path: str, body: object = None, raw: bytes | None = None, key: str | None = None
) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or POST over urllib."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny.gguf"
    build_gguf(path, T.Q8_0)
    return path


@pytest.fixture(scope="module")
def server(tiny):
    s = Server(tiny, "--max-batch", "4")
    yield s
    s.stop()


def complete(server: Server, **body) -> dict:
    status, out = call(server.url, "/v1/completions", body)
    assert status == 200, out
    return out


def test_health_models_and_tokenizer(server):
    assert call(server.url, "/health") == (200, {"status": "ok", "running": 0, "waiting": 0})
    status, models = call(server.url, "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny.gguf"
    status, out = call(server.url, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and out["count"] == 7
    assert call(server.url, "/detokenize", {"tokens": out["tokens"]}) == (200, {"prompt": PROMPT})


def test_greedy_text_equals_generate(server, tiny):
    code, out, _ = run_cli(
        ["generate", PROMPT, "--model", str(tiny), "--temperature", "0", "--max-new-tokens", "12", "--json"]
    )
    assert code == 0
    expected = json.loads(out)
    choice = complete(server, prompt=PROMPT, max_tokens=12, temperature=0)["choices"][0]
    assert choice["text"] == expected["text"]
    assert choice["finish_reason"] == ("length" if expected["finish_reason"] == "length" else "stop")


def test_token_id_prompts_and_stop_strings(server):
    ids = call(server.url, "/tokenize", {"prompt": PROMPT})[1]["tokens"]
    by_text = complete(server, prompt=PROMPT, max_tokens=10, temperature=0)
    by_ids = complete(server, prompt=[ids, ids], max_tokens=10, temperature=0)
    assert [c["text"] for c in by_ids["choices"]] == [by_text["choices"][0]["text"]] * 2
    assert by_ids["usage"] == {"prompt_tokens": 14, "completion_tokens": 20, "total_tokens": 34}
    text = by_text["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = complete(server, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[: text.index(stop)]


def test_concurrent_requests_are_all_served(server):
    bodies = [{"prompt": f"Request {i}", "max_tokens": 8 + i, "seed": i, "n": 1 + i % 2} for i in range(6)]
    results: list = [None] * len(bodies)

    def run(i: int) -> None:
        results[i] = call(server.url, "/v1/completions", bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_SECONDS)
    for body, (status, out) in zip(bodies, results, strict=True):
        assert status == 200
        assert len(out["choices"]) == body["n"]
        assert out["usage"]["completion_tokens"] <= body["n"] * body["max_tokens"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        ({"prompt": "hi", "colour": "blue"}, 422, "colour"),
        ({"max_tokens": 5}, 422, "prompt"),
        ({"prompt": "hi", "max_tokens": "5"}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -1}, 422, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, 422, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ({"prompt": "hi", "n": 0}, 422, "n"),
        ({"prompt": "hi", "stream": "yes"}, 422, "stream"),
        ({"prompt": "hi", "logprobs": 21}, 422, "logprobs"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"prompt": "hi", "seed": -1}, 422, "seed"),
        ({"prompt": "hi", "presence_penalty": 0.5}, 422, "presence_penalty"),
        ({"prompt": []}, 422, "prompt"),
        ({"prompt": [1, "a"]}, 422, "prompt"),
        ({"prompt": [50257]}, 422, "prompt"),
        ({"prompt": [1] * 64, "max_tokens": 1}, 400, "prompt"),
        ({"prompt": [1] * 65, "max_tokens": 0}, 400, "prompt"),
    ],
    ids=lambda x: None if isinstance(x, (bytes, dict)) else str(x),
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    if isinstance(body, bytes):
        got, out = call(server.url, "/v1/completions", raw=body)
    else:
        got, out = call(server.url, "/v1/completions", body)
    assert got == status, out
    assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["param"] == param


def raw_request(server: Server, head: str, body: bytes = b"") -> bytes:
    """Send one HTTP/1.1 request over a plain socket; the response's bytes until the server closes."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_SECONDS) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return response


def test_body_over_the_limit(server):
    # The server answers from the declared length without reading the body (a client that sent it all
    # would see the connection reset).
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\nConnection: close\r\n"
    response = raw_request(server, head)
    assert response.startswith(b"HTTP/1.1 413") and b'"invalid_request_error"' in response


def test_unknown_route_method_and_tokenizer_errors(server):
    assert call(server.url, "/v2/nothing")[0] == 404
    assert call(server.url, "/v1/completions")[0] == 405  # GET
    assert call(server.url, "/detokenize", {"tokens": [1, -2]})[0] == 422
    assert call(server.url, "/tokenize", {"text": "x"})[0] == 422


def test_interrupted_stream_is_dropped(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 50, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_SECONDS) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    for _ in range(100):  # bounded: the engine drops the sequence at its next step
        if call(server.url, "/health")[1]["running"] == 0:
            break
        time.sleep(0.1)
    assert call(server.url, "/health")[1] == {"status": "ok", "running": 0, "waiting": 0}
    assert complete(server, prompt="still there?", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_api_key_and_clean_shutdown(tiny):
    s = Server(tiny, "--api-key", "sesame")
    try:
        assert call(s.url, "/health")[0] == 200
        assert call(s.url, "/v1/models")[0] == 401
        assert call(s.url, "/v1/models", key="wrong")[0] == 401
        assert call(s.url, "/v1/completions", {"prompt": "x"})[1]["error"]["code"] == "invalid_api_key"
        assert call(s.url, "/v1/models", key="sesame")[0] == 200
        # A stream in flight when SIGTERM arrives is finished (or cancelled after the grace period).
        request = urllib.request.Request(
            s.url + "/v1/completions",
            data=json.dumps({"prompt": PROMPT, "max_tokens": 40, "stream": True}).encode(),
            headers={"Authorization": "Bearer sesame", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
            assert response.readline().startswith(b"data: ")
            s.proc.send_signal(signal.SIGTERM)
            rest = response.read()
        assert rest.rstrip().endswith(b"data: [DONE]")
    finally:
        code, log = s.stop()
    assert code == 0 and log.endswith("stopped") and "Traceback" not in log, log


# --- the engine without HTTP -----------------------------------------------------------------------------


def test_engine_drops_a_cancelled_job_at_the_next_step(tiny):
    mf = ModelFile(tiny)
    engine = Engine(GPT2Model(mf.weights, mf.config), mf.tokenizer, max_batch=4)
    body = {"prompt": [PROMPT, "Other"], "max_tokens": 30, "n": 2}
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job(parse_completion_request(body, mf.tokenizer, mf.config.n_ctx), loop) for _ in range(2)]
        for job in jobs:
            engine.submit(job)
        engine._take(block=False)
        engine._admit()
        assert len(engine.running) == 4 and engine.queued == 1  # the second job waits for room
        engine._step()
        jobs[0].cancelled = True
        engine._step()
        engine._admit()
        assert [d.job for d in engine.running] == [jobs[1]] * 4
    finally:
        loop.close()


# --- real clients ---------------------------------------------------------------------------------------


def model_logprobs(tiny: Path, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from the model in this process."""
    mf = ModelFile(tiny)
    model = GPT2Model(mf.weights, mf.config)
    logits = model.forward(ids, model.new_cache()).astype(np.float64)
    lp = logits - logits.max(axis=1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def test_openai_client(server, tiny):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    client = openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_SECONDS
    )
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=3, seed=11)
    assert len(whole.choices) == 3 and whole.usage.completion_tokens <= 30
    assert len({c.text for c in whole.choices}) > 1  # independent samples
    streamed = ["", "", ""]
    for chunk in client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, n=3, seed=11, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in whole.choices]

    top = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = top.choices[0].logprobs
    assert len(lp.tokens) == 5 and "".join(lp.tokens) == top.choices[0].text
    for chosen, alternatives in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(alternatives) == 3 and chosen == max(alternatives.values())  # greedy picks the top one

    ids = call(server.url, "/tokenize", {"prompt": PROMPT})[1]["tokens"]
    echo = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = echo.choices[0]
    assert choice.text == PROMPT and choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], model_logprobs(tiny, ids), rtol=1e-5)


def test_lm_evaluation_harness_local_completions(server, tiny):
    pytest.importorskip(
        "lm_eval", reason="lm-evaluation-harness is not installed: pip install 'lm-eval[api]'"
    )
    pytest.importorskip("tenacity", reason="lm-evaluation-harness's api extra is not installed")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model="tiny", max_length=64, tokenizer_backend="auto"
    )
    pairs = [("The capital of France is", " Paris"), ("Hello, I'm a", " language model")]
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _) in zip(pairs, results, strict=True):
        ids = call(server.url, "/tokenize", {"prompt": context + continuation})[1]["tokens"]
        n_cont = len(call(server.url, "/tokenize", {"prompt": continuation})[1]["tokens"])
        assert logprob == pytest.approx(model_logprobs(tiny, ids)[-n_cont:].sum(), rel=1e-5)
    until = Instance(
        "generate_until", doc={}, arguments=(PROMPT, {"until": ["\n"], "max_gen_toks": 6}), idx=0
    )
    [text] = lm.generate_until([until], disable_tqdm=True)
    expected = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, stop=["\n"])["choices"][0]["text"]
    assert text == expected
