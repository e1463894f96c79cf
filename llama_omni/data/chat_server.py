"""A minimal OpenAI-compatible chat endpoint in front of any `ChatBackend`.

POST /v1/chat/completions with {"messages", "max_tokens"?, "temperature"?}; GET /v1/models.
It lets one process hold a local model while several pipeline shards (kind "openai")
share it, and it is what the tests talk to. Requests are answered one at a time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from llama_omni.data.llm_backends import ChatBackend, LLMError


def make_server(backend: ChatBackend, model: str, host: str = "127.0.0.1", port: int = 0,
                default_max_tokens: int = 256) -> ThreadingHTTPServer:
    """A server bound to (host, port); port 0 picks a free one (`server.server_address`)."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the terminal for progress bars
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = request["messages"]
                max_tokens = int(request.get("max_tokens") or default_max_tokens)
                temperature = float(request.get("temperature") or 0.0)
            except (ValueError, KeyError, TypeError) as err:
                self._send(400, {"error": {"message": f"bad request: {err}"}})
                return
            with lock:
                (reply,) = backend.chat([messages], max_tokens, temperature)
            if isinstance(reply, LLMError):
                self._send(500, {"error": {"message": str(reply)}})
                return
            self._send(200, {
                "id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply}}],
            })

    return ThreadingHTTPServer((host, port), Handler)
