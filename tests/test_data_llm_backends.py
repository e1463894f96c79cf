"""The OpenAI-compatible client against real HTTP servers on loopback: one serving the
packaged SmolLM2 through the chat protocol, one that misbehaves on purpose."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llama_omni.data.chat_server import make_server
from llama_omni.data.llm_backends import LLMError, OpenAIChatBackend, TransformersChatBackend


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/v1"


@pytest.fixture()
def served(request):
    servers = []

    def start(server):
        servers.append(server)
        return _serve(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.filterwarnings("error::FutureWarning")  # generate() gets the cache by today's name
def test_smollm2_through_the_chat_protocol(served):
    local = TransformersChatBackend("packaged:smollm2-135m-instruct", batch_size=2, threads=1)
    url = served(make_server(local, "smollm2"))
    client = OpenAIChatBackend(url, "smollm2", concurrency=2, timeout=120, max_retries=0)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "Say hello."}]]
    remote = client.chat(conversations, max_new_tokens=8)
    assert all(isinstance(r, str) and r for r in remote)
    # greedy decoding: the served replies are the model's own replies
    assert remote == local.chat(conversations, max_new_tokens=8)


class Misbehaving(BaseHTTPRequestHandler):
    """Each request's content names a script: statuses to send before a good answer."""

    calls: dict[str, int] = {}
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _leave(self):
        """Stop counting this request as in flight. Done before the reply is written: the
        client may start its next request as soon as it has read this one, before this
        handler returns, which would count one request too many."""
        cls = type(self)
        with cls.lock:
            cls.in_flight -= self.counted
            self.counted = False

    def _reply(self, status, body: bytes, headers=()):
        self._leave()
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:
            pass  # the client timed out and left, as intended

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        script = request["messages"][-1]["content"]
        cls = type(self)
        self.counted = script.startswith("slow")  # only these measure concurrency
        with cls.lock:
            n = cls.calls[script] = cls.calls.get(script, 0) + 1
            cls.in_flight += self.counted
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            steps = script.split(",")
            step = steps[n - 1] if n <= len(steps) else "ok"
            if step == "429":
                self._reply(429, b'{"error": "slow down"}', [("Retry-After", "0")])
            elif step == "500":
                self._reply(500, b"internal error")
            elif step == "400":
                self._reply(400, b'{"error": "bad request"}')
            elif step == "garbage":
                self._reply(200, b"<html>not json")
            elif step == "hang":
                time.sleep(1.5)
                self._reply(200, b"{}")
            elif step == "slow":
                time.sleep(0.3)
                self._reply(200, _completion("slow ok"))
            else:
                self._reply(200, _completion(f'{{"instruction": "answer to {script}"}}'))
        finally:
            self._leave()


def _completion(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


@pytest.fixture()
def bad_server(served):
    Misbehaving.calls, Misbehaving.in_flight, Misbehaving.max_in_flight = {}, 0, 0
    return served(ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving))


def _ask(client, *scripts):
    return client.chat([[{"role": "user", "content": s}] for s in scripts], max_new_tokens=8)


def test_retries_429_500_and_garbage_then_succeeds(bad_server):
    client = OpenAIChatBackend(bad_server, "m", max_retries=3, backoff=0.01, timeout=5)
    (reply,) = _ask(client, "429,500,garbage")
    assert reply == '{"instruction": "answer to 429,500,garbage"}'
    assert Misbehaving.calls["429,500,garbage"] == 4 and client.attempts == 4


def test_gives_up_after_max_retries_with_the_reason(bad_server):
    client = OpenAIChatBackend(bad_server, "m", max_retries=2, backoff=0.01, timeout=5)
    (error,) = _ask(client, "500,500,500,500")
    assert isinstance(error, LLMError) and error.reason == "http_500"
    assert "3 attempts" in str(error) and Misbehaving.calls["500,500,500,500"] == 3


def test_client_errors_are_not_retried(bad_server):
    client = OpenAIChatBackend(bad_server, "m", max_retries=3, backoff=0.01, timeout=5)
    (error,) = _ask(client, "400")
    assert error.reason == "http_400" and Misbehaving.calls["400"] == 1


def test_timeout_then_success(bad_server):
    client = OpenAIChatBackend(bad_server, "m", max_retries=1, backoff=0.01, timeout=0.5)
    start = time.monotonic()
    ok, error = _ask(client, "hang", "hang,hang")
    assert ok == '{"instruction": "answer to hang"}'
    assert isinstance(error, LLMError) and error.reason == "timeout"
    assert time.monotonic() - start < 5


def test_concurrency_and_rate_limit(bad_server):
    client = OpenAIChatBackend(bad_server, "m", concurrency=3, max_retries=0, timeout=5)
    replies = _ask(client, *[f"slow,{i}" for i in range(6)])
    assert replies == ["slow ok"] * 6 and Misbehaving.max_in_flight == 3
    limited = OpenAIChatBackend(bad_server, "m", concurrency=4, requests_per_second=10,
                                max_retries=0, timeout=5)
    start = time.monotonic()
    _ask(limited, *[f"r{i}" for i in range(6)])
    assert time.monotonic() - start >= 0.5  # 6 request starts, at least 0.1 s apart


def test_shared_prefix_cache_gives_the_same_replies():
    backend = TransformersChatBackend("packaged:smollm2-135m-instruct", batch_size=4, threads=1)
    system = {"role": "system", "content": "You are a helpful assistant who answers in one short "
                                           "sentence, plainly and kindly, without lists."}
    conversations = [[system, {"role": "user", "content": q}] for q in
                     ("What is the capital of France?", "Name a fruit.", "Hi")]
    cached = backend.chat(conversations, max_new_tokens=8)
    backend.MIN_SHARED_PREFIX = 10**6  # plain left padding, no shared cache
    assert backend.chat(conversations, max_new_tokens=8) == cached
