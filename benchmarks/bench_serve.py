"""Load on `gpt2 serve` over loopback: one streaming client, then N concurrent ones (run by hand).

Each phase lasts --seconds: every client sends streaming completions back to back until then (a request
running at the deadline finishes, bounded by --max-tokens). Reports generated tokens/s (one SSE chunk with
text is one token), the aggregate's ratio to one client, failed requests and the time to first token (median,
p99). With --llama, llama.cpp's server from llama-cpp-python[server] (`python -m llama_cpp.server`, on its
plain CPU path) runs the same load on the same file in the same run.

    python benchmarks/bench_serve.py /tmp/gpt2-bench/distilgpt2.Q4_K_M.gguf --clients 16 --seconds 30 --llama
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPT = "Hello, I'm a language model,"
START_SECONDS = 300
# llama.cpp's server on its plain CPU path, as tests/llama_oracle.py loads it: a default pip build repacks
# weights for AMX and dies of SIGILL on quantized files where the kernel does not grant AMX (this VM).
LLAMA_SERVER = """
import runpy, sys
import llama_cpp.llama_cpp as c
defaults = c.llama_model_default_params
def plain_cpu_params():
    params = defaults()
    params.use_extra_bufts = False
    return params
c.llama_model_default_params = plain_cpu_params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


@dataclass
class Tally:
    tokens: int = 0
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    first_token_seconds: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gpt2(model: str, max_batch: int, port: int) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "gpt2cli", "serve", "--model", model, "--port", str(port)]
    return subprocess.Popen([*command, "--max-batch", str(max_batch)], env=env, stderr=subprocess.DEVNULL)


def start_llama(model: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", LLAMA_SERVER, "--model", model, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "0", "--n_threads", "2", "--n_threads_batch", "2"]
    command += ["--interrupt_requests", "False"]  # queue concurrent requests instead of cutting them off
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server on port {port} did not start")


def stream_once(port: int, max_tokens: int, tally: Tally, lock: threading.Lock) -> None:
    """One streaming completion; counts its tokens, its time to first token, or its failure."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "stream": True}
    t0 = time.perf_counter()
    tokens, first = 0, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        for line in response:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "error"))
            if any(c.get("text") for c in chunk["choices"]):
                tokens += 1
                first = first if first is not None else time.perf_counter() - t0
        conn.close()
    except (OSError, RuntimeError, ValueError) as e:
        with lock:
            tally.failures.append(str(e))
        time.sleep(0.1)  # a dead server fails fast: do not spin
        return
    with lock:
        tally.tokens += tokens
        tally.requests += 1
        if first is not None:
            tally.first_token_seconds.append(first)


def load(port: int, clients: int, seconds: float, max_tokens: int) -> tuple[Tally, float]:
    """Clients stream back to back until the deadline; (tally, wall seconds including the last requests)."""
    tally, lock = Tally(), threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            stream_once(port, max_tokens, tally, lock)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - t0


def report(name: str, port: int, args: argparse.Namespace) -> None:
    stream_once(port, 4, Tally(), threading.Lock())  # warm up (compiles, caches)
    rates = {}
    for clients in (1, args.clients):
        tally, seconds = load(port, clients, args.seconds, args.max_tokens)
        rates[clients] = tally.tokens / seconds
        ttft = sorted(tally.first_token_seconds) or [float("nan")]
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        print(
            f"{name}: {clients:2d} clients, {tally.requests} requests, {len(tally.failures)} failed, "
            f"{rates[clients]:.1f} tok/s, time to first token median {statistics.median(ttft):.3f} s "
            f"p99 {p99:.3f} s",
            flush=True,
        )
        for failure in sorted(set(tally.failures))[:3]:
            print(f"    failure: {failure}")
    if rates[1] > 0:
        print(f"{name}: aggregate over one client {rates[args.clients] / rates[1]:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .gguf file")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--llama", action="store_true", help="also llama.cpp's server (llama-cpp-python[server])"
    )
    args = parser.parse_args()
    servers = [("gpt2 serve", lambda port: start_gpt2(args.model, args.max_batch, port))]
    if args.llama:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            print(f"llama.cpp's server is not available ({e}): pip install 'llama-cpp-python[server]'")
        else:
            servers.append(("llama.cpp server", lambda port: start_llama(args.model, port)))
    for name, start in servers:
        port = free_port()
        proc = start(port)
        try:
            wait_ready(port, proc)
            report(name, port, args)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
