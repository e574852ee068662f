"""Real servers on the loopback for the deployment tests: llama-cpp-python's OpenAI-compatible
server, and a proxy in front of it that injects the faults of a real network (HTTP 429 and 5xx,
dropped connections, cut-off bodies, a server that stops answering)."""

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

GUARD_DIR = Path(__file__).parents[1] / "offline"
SERVED_NAME = "tiny"
SLOW_SECONDS = 3.0  # how long a "slow" fault holds a request: longer than the timeouts the tests set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(gguf: Path, log_dir: Path, *options: str, port: int | None = None):
    """llama-cpp-python's server on ``gguf`` at ``port`` (default: a free loopback port), serving it
    as ``tiny``; yields its API root. The network guard runs in the server process too."""
    port = port or free_port()
    network_log = log_dir / f"server-{port}-network.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(GUARD_DIR), os.environ.get("PYTHONPATH")])),
           "QUADA_NETWORK_LOG": str(network_log)}
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
               str(port), "--model_alias", SERVED_NAME, "--n_threads", "1", "--n_ctx", "512", *options]
    with open(log_dir / f"server-{port}.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/v1/models")
                if connection.getresponse().status in (200, 401):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the llama.cpp server did not start:\n{(log_dir / f'server-{port}.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not network_log.exists(), network_log.read_text()


class FaultProxy:
    """An HTTP proxy on the loopback in front of a real server. Requests to a completions endpoint
    take the next entry of ``faults`` (``None`` passes the request on; ``429``/``503`` answer with
    that status; ``"cut"`` sends half of the real answer's body and closes; ``"drop"`` closes the
    connection without an answer; ``"down"`` drops this and every later request; ``"slow"`` passes it
    on after :data:`SLOW_SECONDS`); other requests pass. ``rewrite`` may change a request body before it is passed on. ``passed`` counts the
    completions that reached the server."""

    def __init__(self, upstream: str):
        self.upstream_port = int(upstream.split(":")[2].split("/")[0])
        self.faults: list = []
        self.rewrite = None
        self.passed = 0
        self.down = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(b"")

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _forward(self, body: bytes):
                fault = None
                if "completions" in self.path:
                    fault = "down" if proxy.down else (proxy.faults.pop(0) if proxy.faults else None)
                if fault in ("drop", "down"):
                    proxy.down = proxy.down or fault == "down"
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(fault, int):
                    self.send_response(fault)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                if fault == "slow":
                    time.sleep(SLOW_SECONDS)
                if body and proxy.rewrite is not None:
                    body = json.dumps(proxy.rewrite(json.loads(body))).encode()
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                if "completions" in self.path:
                    proxy.passed += 1
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
