"""`gpt2 serve`: OpenAI's completions API over HTTP, concurrent requests decoded as one batch.

One engine thread owns the model. Requests are validated and tokenized on the event loop, queued, and admitted
while the batch has room (`max_batch` sequences); each engine step samples one token for every running
sequence and runs them all through one `model.decode_batch`, so concurrent clients share each pass over the
weights. Text and log-probabilities flow back to the event loop as one event per choice and token.

Starlette and uvicorn are the `serve` extra: only `gpt2 serve` imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import secrets
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpt2cli.errors import Gpt2Error
from gpt2cli.model import GPT2Model, KVCache
from gpt2cli.sampling import Sampler, SamplingConfig
from gpt2cli.tokenizer import StreamDecoder, Tokenizer

MAX_BODY_BYTES = 4 << 20
MAX_SEQUENCES = 64  # prompts x n in one request
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
# After Ctrl-C / SIGTERM, requests in flight get this long to finish before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 5.0

ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "not_found_error",
    500: "server_error",
}


class ApiError(Exception):
    """A request the server refuses, sent as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        error = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse({"error": error}, status_code=self.status)


# --- requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[list[int]]
    max_tokens: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # how many alternatives per token; None: no log-probabilities
    echo: bool
    sampling: SamplingConfig

    @property
    def n_sequences(self) -> int:
        return len(self.prompts) * self.n


FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
    "logprobs", "echo", "top_k", "repetition_penalty", "user",
    # OpenAI's fields this server does not implement: accepted at their neutral values only.
    "frequency_penalty", "presence_penalty", "best_of", "logit_bias", "suffix",
}  # fmt: skip


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise ApiError(422, f"unknown field '{_shown(name)}'", name)


def _string(body: dict, name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], str):
        raise ApiError(422, f"'{name}' must be a string, got {_shown(body[name])}", name)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"'{name}' must be an integer, got {_shown(value)}", name)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(422, f"'{name}' must be {bounds}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float, valid: Callable[[float], bool], expected: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise ApiError(422, f"'{name}' must be {expected}, got {_shown(value)}", name)
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(422, f"'{name}' must be true or false, got {_shown(value)}", name)
    return bool(value)


def _prompts(value: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of those; '' is <|endoftext|>."""

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        texts = value
    elif is_ids(value):
        return [check_token_ids(value, tokenizer, "prompt")]
    elif isinstance(value, list) and value and all(is_ids(p) for p in value):
        return [check_token_ids(p, tokenizer, "prompt") for p in value]
    else:
        raise ApiError(
            422,
            "'prompt' must be a string, a list of strings, a list of token ids or a list of those",
            "prompt",
        )
    return [tokenizer.encode(text) or [tokenizer.eos_id] for text in texts]


def check_token_ids(ids: list[int], tokenizer: Tokenizer, name: str) -> list[int]:
    if any(not 0 <= t < tokenizer.n_vocab for t in ids):
        raise ApiError(422, f"'{name}' has token ids outside [0, {tokenizer.n_vocab})", name)
    return ids


def parse_completion_request(body: dict, tokenizer: Tokenizer, n_ctx: int) -> CompletionRequest:
    """Validate a /v1/completions body; ApiError (422 for a bad field, 400 for a prompt too long)."""
    check_fields(body, FIELDS)
    if "prompt" not in body:
        raise ApiError(422, "'prompt' is required", "prompt")
    _string(body, "model")  # one model is served, whatever the name
    _string(body, "user")
    n = _integer(body, "n", 1, 1, MAX_SEQUENCES)
    for name in ("frequency_penalty", "presence_penalty"):
        _number(body, name, 0.0, lambda x: x == 0, "0 (not supported)")
    _integer(body, "best_of", n, n, n)
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(422, "'logit_bias' is not supported", "logit_bias")
    if body.get("suffix") is not None:
        raise ApiError(422, "'suffix' is not supported", "suffix")

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            422, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", "stop"
        )
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise ApiError(422, "'stream_options' may only hold 'include_usage'", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")

    sampling = SamplingConfig(
        temperature=_number(body, "temperature", 1.0, lambda x: 0 <= x <= 2, "a number between 0 and 2"),
        top_k=_integer(body, "top_k", 0, 0),
        top_p=_number(body, "top_p", 1.0, lambda x: 0 < x <= 1, "a number in (0, 1]"),
        repetition_penalty=_number(
            body, "repetition_penalty", 1.0, lambda x: 0 < x < float("inf"), "a finite number > 0"
        ),
    )
    request = CompletionRequest(
        prompts=_prompts(body["prompt"], tokenizer),
        max_tokens=_integer(body, "max_tokens", 16, 0),
        n=n,
        seed=_integer(body, "seed", None, 0),
        stop=tuple(stops),
        stream=_boolean(body, "stream"),
        include_usage=include_usage,
        logprobs=_integer(body, "logprobs", None, 0, MAX_LOGPROBS),
        echo=_boolean(body, "echo"),
        sampling=sampling,
    )
    if request.n_sequences > MAX_SEQUENCES:
        raise ApiError(422, f"prompts x n is {request.n_sequences}, at most {MAX_SEQUENCES}", "n")
    for ids in request.prompts:
        room = n_ctx - 1 if request.max_tokens > 0 else n_ctx
        if len(ids) > room:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens, the model's context is {n_ctx}"
                + (" and at least one must be left to generate" if request.max_tokens > 0 else ""),
                "prompt",
                "context_length_exceeded",
            )
    return request


# --- the engine: batched decoding on one thread ---------------------------------------------------------


@dataclass
class Logprobs:
    """OpenAI's per-token log-probabilities for some tokens of one choice (None where a token has none)."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)


@dataclass
class ChoiceEvent:
    """More text of choice `index`; the last event of a choice has its finish_reason."""

    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Failure:
    """The request failed as a whole: an error object with this HTTP status instead of more choices."""

    message: str
    status: int = 500


class Job:
    """One request in the engine: its sequences' events go to an asyncio queue on the server's loop."""

    def __init__(self, request: CompletionRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.samplers = Sampler(request.sampling, request.seed).spawn(request.n_sequences)  # one per choice
        self.events: asyncio.Queue[ChoiceEvent | Failure] = asyncio.Queue()
        self.cancelled = False  # set by the server when the client goes away: the engine drops the job

    def send(self, event: ChoiceEvent | Failure) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class StopText:
    """Releases text as it grows, holding back a tail that could still begin a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text to release, whether a stop string was reached: the text ends before it)."""
        text = self.held + piece
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False


def log_softmax(logits: np.ndarray) -> np.ndarray:  # f32[m, vocab] -> f64[m, vocab]
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, ids: list[int], top: int, tokenizer: Tokenizer) -> Logprobs:
    """The model's own log-probabilities (before any sampling option) of ids[i] under logits[i] f32[m, vocab],
    with the `top` most likely alternatives."""
    lp = log_softmax(logits)
    out = Logprobs()
    for row, token in zip(lp, ids, strict=True):
        best = np.argpartition(row, -top)[-top:] if top else np.empty(0, dtype=np.int64)
        best = best[np.argsort(-row[best])]
        out.tokens.append(tokenizer.decode([token]))
        out.token_logprobs.append(float(row[token]))
        out.top_logprobs.append({tokenizer.decode([int(t)]): float(row[t]) for t in best})
    return out


class Decoding:
    """One choice being generated: its cache, sampler, context and the text released so far."""

    def __init__(
        self, job: Job, index: int, prompt: list[int], budget: int, cache: KVCache, logits: np.ndarray,
        sampler: Sampler, tokenizer: Tokenizer,
    ) -> None:  # fmt: skip
        self.job, self.index, self.budget, self.cache, self.sampler = job, index, budget, cache, sampler
        self.context = np.array(prompt + [0] * budget, dtype=np.int64)  # prompt + generated
        self.length = len(prompt)
        self.generated = 0
        self.logits = logits  # f32[vocab] for the next token
        self.decoder = StreamDecoder(tokenizer)
        self.stops = StopText(job.request.stop)


class Engine:
    """Runs every request's sequences on one thread, at most `max_batch` of them per decoding step."""

    def __init__(self, model: GPT2Model, tokenizer: Tokenizer, max_batch: int) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.running: list[Decoding] = []
        self.stopping = False
        self.closing = False  # the server is shutting down: fail whatever is running or comes in
        self.thread = threading.Thread(target=self._run, name="gpt2-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Fail every request in flight or to come (503), so their responses end before the server does."""
        self.closing = True
        self.inbox.put(None)

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    @property
    def queued(self) -> int:
        """Requests not yet admitted to the batch."""
        return len(self.waiting) + self.inbox.qsize()

    def _run(self) -> None:
        # The kernels' threads leave a core to the event loop (HTTP, SSE, tokenizing): a parallel kernel
        # waits for its slowest thread, and one preempted by the loop stalls every step. With both cores
        # the engine's, 1 client streamed 23 tok/s and 16 clients 137 tok/s; with one, 66 and 184
        # (benchmarks/bench_serve.py, distilgpt2 Q4_K_M, 2 cores).
        numba.set_num_threads(max(1, numba.get_num_threads() - 1))
        while not self.stopping:
            self._take(block=not self.running and not self.waiting)
            if self.closing:
                self._fail_all(Failure("the server is shutting down", 503))
                continue
            try:
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # a bug must fail the requests in flight, not stop the server
                self._fail_all(Failure(f"internal error: {type(e).__name__}: {e}"))

    def _fail_all(self, failure: Failure) -> None:
        jobs = {id(d.job): d.job for d in self.running} | {id(job): job for job in self.waiting}
        for job in jobs.values():
            job.send(failure)
        self.running, self.waiting = [], deque()

    def _take(self, block: bool) -> None:
        with contextlib.suppress(queue.Empty):
            job = self.inbox.get(block=block)
            while True:
                if job is not None:
                    self.waiting.append(job)
                job = self.inbox.get_nowait()

    def _admit(self) -> None:
        """Start the waiting requests that fit the batch (the first one always), their prompts in one pass."""
        starting, room = [], self.max_batch - len(self.running)
        while self.waiting:
            job = self.waiting[0]
            if not job.cancelled and (self.running or starting) and job.request.n_sequences > room:
                break
            self.waiting.popleft()
            if not job.cancelled:
                starting.append(job)
                room -= job.request.n_sequences
        if starting:
            try:
                self.running += self._start(starting)
            except Gpt2Error as e:
                for job in starting:
                    job.send(Failure(str(e)))

    def _start(self, jobs: list[Job]) -> list[Decoding]:
        """Prefill every prompt of these requests in one forward pass; a prompt's n choices start from
        copies of its cache."""
        model, tokenizer = self.model, self.tokenizer
        starts = []  # (job, prompt index, prompt, token budget, whether every prompt position is scored)
        for job in jobs:
            request = job.request
            for p, prompt in enumerate(request.prompts):
                budget = min(request.max_tokens, model.config.n_ctx - len(prompt))
                starts.append((job, p, prompt, budget, request.echo and request.logprobs is not None))
        caches = [model.new_cache(len(prompt) + budget) for _, _, prompt, budget, _ in starts]
        logits = model.forward_batch(
            [prompt for _, _, prompt, _, _ in starts],
            caches,
            [0 if all_rows else len(prompt) - 1 for _, _, prompt, _, all_rows in starts],
        )  # the prompts' rows back to back
        sequences, r0 = [], 0
        for (job, p, prompt, budget, all_rows), cache in zip(starts, caches, strict=True):
            request = job.request
            rows = logits[r0 : r0 + (len(prompt) if all_rows else 1)]
            r0 += len(rows)
            if request.echo:
                echoed = None
                if all_rows:  # the first token has no context to be predicted from
                    echoed = token_logprobs(rows[:-1], prompt[1:], request.logprobs, tokenizer)
                    echoed.tokens.insert(0, tokenizer.decode(prompt[:1]))
                    echoed.token_logprobs.insert(0, None)
                    echoed.top_logprobs.insert(0, None)
                text = tokenizer.decode(prompt)
            for c in range(request.n):
                index = p * request.n + c
                if request.echo:
                    job.send(ChoiceEvent(index, text, echoed))
                fork = cache if c == 0 else cache.fork()
                sampler = job.samplers[index]
                sequences.append(Decoding(job, index, prompt, budget, fork, rows[-1], sampler, tokenizer))
        return sequences

    def _step(self) -> None:
        """Sample a token for every running sequence, then one batched forward for those that go on."""
        going = []
        for seq in self.running:
            if seq.job.cancelled:
                continue
            if seq.generated == seq.budget:  # max_tokens 0, or the context is full
                self._finish(seq, "length")
                continue
            token = seq.sampler.next_token(seq.logits, seq.context[: seq.length])
            if token == self.tokenizer.eos_id:
                self._finish(seq, "stop")
                continue
            seq.context[seq.length] = token
            seq.length += 1
            seq.generated += 1
            text, stopped = seq.stops.push(seq.decoder.push(token))
            top = seq.job.request.logprobs
            logprobs = None if top is None else token_logprobs(seq.logits[None], [token], top, self.tokenizer)
            if stopped:
                self._finish(seq, "stop", text, logprobs, at_stop=True)
            elif seq.generated == seq.budget:
                self._finish(seq, "length", text, logprobs)
            else:
                seq.job.send(ChoiceEvent(seq.index, text, logprobs))
                going.append(seq)
        self.running = going
        if going:
            logits = self.model.decode_batch(
                [s.context[s.length - 1] for s in going], [s.cache for s in going]
            )
            for seq, row in zip(going, logits, strict=True):
                seq.logits = row

    def _finish(
        self,
        seq: Decoding,
        reason: str,
        text: str = "",
        logprobs: Logprobs | None = None,
        at_stop: bool = False,
    ) -> None:
        """The choice's last event; unless a stop string ended it (at_stop), the held-back text goes out."""
        if not at_stop:
            tail, stopped = seq.stops.push(seq.decoder.flush())
            text += tail if stopped else tail + seq.stops.held
            reason = "stop" if stopped else reason
        if seq.job.request.logprobs is not None and logprobs is None:
            logprobs = Logprobs()
        seq.job.send(ChoiceEvent(seq.index, text, logprobs, reason, seq.generated))


# --- HTTP -----------------------------------------------------------------------------------------------


async def read_json(request: Request) -> dict:
    """The body as a JSON object: 413 over MAX_BODY_BYTES, 400 when it is not JSON or not an object."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError:  # UnicodeDecodeError is one
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class Completion:
    """Builds the response of one request from its events: whole (collect) or as server-sent events."""

    def __init__(self, job: Job, model_id: str) -> None:
        self.job = job
        self.head = {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        request = job.request
        self.text_offset = [0] * request.n_sequences
        self.usage = {"prompt_tokens": sum(len(p) for p in request.prompts), "completion_tokens": 0}
        self.unfinished = request.n_sequences

    def choice(self, event: ChoiceEvent | Failure) -> dict:
        """OpenAI's choice object for an event; counts the finished choices and their tokens."""
        if isinstance(event, Failure):
            raise ApiError(event.status, event.message)
        logprobs = None
        if event.logprobs is not None:
            offsets = np.cumsum([0] + [len(t) for t in event.logprobs.tokens]) + self.text_offset[event.index]
            self.text_offset[event.index] = int(offsets[-1])
            logprobs = {**vars(event.logprobs), "text_offset": offsets[:-1].tolist()}
        if event.finish_reason is not None:
            self.unfinished -= 1
            self.usage["completion_tokens"] += event.completion_tokens
        return {
            "text": event.text,
            "index": event.index,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }

    def usage_dict(self) -> dict:
        return {**self.usage, "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}

    async def collect(self) -> dict:
        choices: dict[int, dict] = {}
        while self.unfinished:
            part = self.choice(await self.job.events.get())
            whole = choices.setdefault(part["index"], {**part, "text": ""})
            whole["text"] += part["text"]
            whole["finish_reason"] = part["finish_reason"]
            if part["logprobs"] is not None:
                if whole["logprobs"] is part["logprobs"]:
                    whole["logprobs"] = {k: [] for k in part["logprobs"]}
                for k, values in part["logprobs"].items():
                    whole["logprobs"][k] += values
        return {**self.head, "choices": [choices[i] for i in sorted(choices)], "usage": self.usage_dict()}

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them; the job is cancelled when the client goes away."""
        try:
            while self.unfinished:
                try:
                    chunk = {**self.head, "choices": [self.choice(await self.job.events.get())]}
                except ApiError as e:
                    yield f"data: {json.dumps(json.loads(e.response().body))}\n\ndata: [DONE]\n\n"
                    return
                yield f"data: {json.dumps(chunk)}\n\n"
            if self.job.request.include_usage:
                yield f"data: {json.dumps({**self.head, 'choices': [], 'usage': self.usage_dict()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """(True, result) of work, or (False, None) as soon as the client disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        watch.cancel()
        return True, task.result()
    task.cancel()
    return False, None


class BearerAuth:
    """ASGI middleware: every path but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(
                    401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key"
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    engine: Engine, tokenizer: Tokenizer, model_id: str, n_ctx: int, api_key: str | None = None
) -> Starlette:
    started = int(time.time())

    async def completions(request: Request) -> Response:
        job = Job(
            parse_completion_request(await read_json(request), tokenizer, n_ctx), asyncio.get_running_loop()
        )
        engine.submit(job)
        completion = Completion(job, model_id)
        if job.request.stream:
            return StreamingResponse(
                completion.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        try:
            connected, result = await unless_disconnected(request, completion.collect())
        finally:
            job.cancelled = True  # a no-op once every choice has finished
        return JSONResponse(result) if connected else Response(status_code=499)

    async def models(request: Request) -> Response:
        card = {
            "id": model_id,
            "object": "model",
            "created": started,
            "owned_by": "gpt2",
            "max_model_len": n_ctx,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "running": len(engine.running), "waiting": engine.queued})

    async def tokenizer_info(request: Request) -> Response:
        eos = tokenizer.special_text
        info = {
            "eos_token": eos,
            "bos_token": eos,
            "model_max_length": n_ctx,
            "tokenizer_class": "GPT2Tokenizer",
        }
        return JSONResponse(info)

    # /tokenize and /detokenize take and return vLLM's shapes, which lm-evaluation-harness looks for.
    async def tokenize(request: Request) -> Response:
        body = await read_json(request)
        check_fields(body, {"prompt", "add_special_tokens", "model"})
        if not isinstance(body.get("prompt"), str):
            raise ApiError(422, "'prompt' must be a string", "prompt")
        _boolean(body, "add_special_tokens")
        ids = tokenizer.encode(body["prompt"])  # GPT-2 adds no special tokens either way
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": n_ctx})

    async def detokenize(request: Request) -> Response:
        body = await read_json(request)
        check_fields(body, {"tokens", "model"})
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise ApiError(422, "'tokens' must be a list of token ids", "tokens")
        return JSONResponse({"prompt": tokenizer.decode(check_token_ids(ids, tokenizer, "tokens"))})

    async def api_error(request: Request, exc: Exception) -> Response:
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        return ApiError(exc.status_code, exc.detail).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        return ApiError(500, f"internal error: {type(exc).__name__}").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown gives requests in flight a grace period and then fails them."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_SECONDS, self.engine.close)
        await super().shutdown(sockets)


def run_server(
    model: GPT2Model,
    tokenizer: Tokenizer,
    model_id: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    log: Callable[[str], None],
    verbose: bool = False,
) -> None:
    """Serve until Ctrl-C or SIGTERM, then finish what is in flight (cancelling it after a grace period)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()  # connections made before uvicorn starts wait in the backlog
    except OSError as e:
        raise Gpt2Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    engine = Engine(model, tokenizer, max_batch)
    app = build_app(engine, tokenizer, model_id, model.config.n_ctx, api_key)
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        # A backstop: the engine fails what is still running first, so the responses end on their own.
        timeout_graceful_shutdown=2 * SHUTDOWN_GRACE_SECONDS,
    )
    server = GracefulServer(config, engine)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    log(f"serving {model_id} on http://{shown}:{bound_port}/v1 (OpenAI completions; max batch {max_batch})")
    # uvicorn stops gracefully on these signals, then raises them again: after a clean stop they end here.
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()
    log("stopped")
