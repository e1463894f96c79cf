"""Chat LLM backends for rewriting and responses: an OpenAI-compatible endpoint, or a local
transformers model.

Both take a batch of conversations (lists of {"role", "content"} messages) and return,
per conversation, the reply text or the `LLMError` that ended its attempts, so one bad
item never sinks a batch. Greedy decoding (temperature 0) is the default: reruns of the
pipeline then give the same data.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

from llama_omni.configbase import ConfigBase, require

Messages = list[dict[str, str]]
BACKEND_KINDS = ("transformers", "openai")
MAX_RETRY_AFTER = 60.0  # seconds: longer Retry-After hints are capped


class LLMError(RuntimeError):
    """A request that failed for good; `reason` is a short tag for the summary report."""

    def __init__(self, reason: str, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after  # the server's Retry-After header, if any


@dataclass
class BackendConfig(ConfigBase):
    """Which LLM answers, and how hard the pipeline may push it.

    kind "transformers": `model` is a Hugging Face directory or a packaged name, run in
    this process in batches of `batch_size` with `threads` CPU threads.
    kind "openai": `model` is the served model name at `base_url` (e.g.
    http://127.0.0.1:8000/v1); the key is read from the environment variable `api_key_env`.
    """

    kind: str = "transformers"
    model: str = "packaged:smollm2-135m-instruct"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = 16
    threads: int = 1
    concurrency: int = 4
    requests_per_second: float | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0
    max_new_tokens: int = 128
    temperature: float = 0.0

    def __post_init__(self) -> None:
        require(self.kind in BACKEND_KINDS,
                f"llm.kind {self.kind!r}: choose one of {BACKEND_KINDS}")
        require(self.kind != "openai" or bool(self.base_url),
                "llm.base_url is required for kind 'openai' (e.g. http://127.0.0.1:8000/v1)")
        for name in ("batch_size", "threads", "concurrency", "max_new_tokens"):
            require(getattr(self, name) >= 1, f"llm.{name} must be >= 1")
        require(self.timeout > 0 and self.backoff >= 0 and self.max_retries >= 0,
                "llm.timeout must be > 0, llm.backoff and llm.max_retries >= 0")
        require(self.requests_per_second is None or self.requests_per_second > 0,
                "llm.requests_per_second must be > 0 (or null for no limit)")
        require(self.temperature >= 0, "llm.temperature must be >= 0")


class ChatBackend(ABC):
    @abstractmethod
    def chat(self, conversations: list[Messages], max_new_tokens: int,
             temperature: float = 0.0) -> list[str | LLMError]:
        """One reply (or the error that ended its attempts) per conversation, in order."""


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, across threads."""

    def __init__(self, rate: float | None):
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class OpenAIChatBackend(ChatBackend):
    """POST {base_url}/chat/completions with a thread pool of `concurrency` requests.

    Retried: HTTP 429 and 5xx, timeouts, refused connections and bodies that are not a chat
    completion, with exponential backoff and jitter (a Retry-After header wins, capped at
    MAX_RETRY_AFTER). Not retried: other 4xx (a bad request stays bad).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 concurrency: int = 4, requests_per_second: float | None = None,
                 timeout: float = 60.0, max_retries: int = 4, backoff: float = 1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self.limiter = RateLimiter(requests_per_second)
        self.attempts = 0  # requests sent, retries included (for reports and tests)
        self._count_lock = threading.Lock()

    def chat(self, conversations: list[Messages], max_new_tokens: int,
             temperature: float = 0.0) -> list[str | LLMError]:
        def one(messages: Messages) -> str | LLMError:
            try:
                return self._complete(messages, max_new_tokens, temperature)
            except LLMError as err:
                return err

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, conversations))

    def _complete(self, messages: Messages, max_new_tokens: int, temperature: float) -> str:
        payload = json.dumps({"model": self.model, "messages": messages,
                              "max_tokens": max_new_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        error: LLMError | None = None
        for attempt in range(self.max_retries + 1):
            if error is not None:
                time.sleep(self._delay(attempt, error))
            self.limiter.wait()
            with self._count_lock:
                self.attempts += 1
            try:
                request = urllib.request.Request(self.url, payload, headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _reply_text(response.read())
            except urllib.error.HTTPError as err:
                error = LLMError(f"http_{err.code}", f"{self.url}: HTTP {err.code} "
                                 f"{err.read(300).decode(errors='replace')!r}",
                                 err.headers.get("Retry-After"))
                if err.code != 429 and err.code < 500:
                    raise error from None
            except TimeoutError:
                error = LLMError("timeout", f"{self.url}: no answer within {self.timeout} s")
            except urllib.error.URLError as err:
                timed_out = isinstance(err.reason, TimeoutError)
                error = LLMError("timeout" if timed_out else "connection",
                                 f"{self.url}: {err.reason}")
            except (ConnectionError, http.client.HTTPException) as err:
                error = LLMError("connection", f"{self.url}: {type(err).__name__}: {err}")
            except LLMError as err:  # a body that is not a chat completion
                error = err
        assert error is not None
        raise LLMError(error.reason, f"{error} (gave up after {self.max_retries + 1} attempts)")

    def _delay(self, attempt: int, error: LLMError) -> float:
        if error.retry_after:
            try:
                return min(MAX_RETRY_AFTER, max(0.0, float(error.retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2)


def _reply_text(body: bytes) -> str:
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LLMError("bad_response", f"not a chat completion: {body[:200]!r}") from None
    if not isinstance(content, str):
        raise LLMError("bad_response", f"message content is not text: {content!r}")
    return content


class TransformersChatBackend(ChatBackend):
    """A local causal LM with a chat template, batched.

    Conversations are sorted by prompt length before batching, so each batch pads little.
    The prompt prefix all rows of a batch share (system prompt, few-shot examples) is run
    once and its KV cache copied to every row; each row is then laid out as [prefix][pads]
    [own tokens] with the pads masked, which halves the compute of short-answer prompts.
    `threads` sets torch's CPU threads for this process.
    """

    MIN_SHARED_PREFIX = 16  # tokens; shorter shared prefixes are not worth a separate pass

    def __init__(self, model: str = "packaged:smollm2-135m-instruct", batch_size: int = 16,
                 threads: int = 1, device: str = "cpu", seed: int = 0):
        self.source, self.batch_size = model, batch_size
        self.threads, self.device, self.seed = threads, device, seed

    @cached_property
    def _loaded(self):
        import torch

        from llama_omni.model.llm import load_backbone

        torch.set_num_threads(self.threads)
        model, tokenizer = load_backbone(self.source, device=self.device)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def chat(self, conversations: list[Messages], max_new_tokens: int,
             temperature: float = 0.0) -> list[str | LLMError]:
        _, tokenizer = self._loaded
        prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                   for c in conversations]
        ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        replies: list[str | LLMError] = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            new = self._generate([ids[i] for i in index], max_new_tokens, temperature)
            for i, tokens in zip(index, new):
                replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        return replies

    def _generate(self, rows: list[list[int]], max_new_tokens: int, temperature: float):
        import torch
        from transformers import DynamicCache

        from llama_omni.model.llm import cache_keyword

        model, tokenizer = self._loaded
        shared = 0  # keep at least one own token per row: generation starts from it
        while (all(len(r) > shared + 1 for r in rows)
               and len({r[shared] for r in rows}) == 1):
            shared += 1
        cache = None
        with torch.inference_mode():
            if shared >= self.MIN_SHARED_PREFIX:
                cache = DynamicCache(config=model.config)
                model(input_ids=torch.tensor([rows[0][:shared]], device=self.device),
                      use_cache=True, **{cache_keyword(model): cache})
                cache.batch_repeat_interleave(len(rows))
            else:
                shared = 0
            width = max(len(r) - shared for r in rows)
            pad = tokenizer.pad_token_id
            input_ids = [r[:shared] + [pad] * (width - len(r) + shared) + r[shared:] for r in rows]
            mask = [[1] * shared + [0] * (width - len(r) + shared) + [1] * (len(r) - shared)
                    for r in rows]
            sampling = temperature > 0
            if sampling:
                torch.manual_seed(self.seed)
            out = model.generate(
                input_ids=torch.tensor(input_ids, device=self.device),
                attention_mask=torch.tensor(mask, device=self.device),
                **{cache_keyword(model): cache}, max_new_tokens=max_new_tokens, do_sample=sampling,
                temperature=temperature if sampling else None, top_p=None, top_k=None,
                pad_token_id=pad)
        return out[:, shared + width:]  # [B, new tokens]


def make_backend(config: BackendConfig, seed: int = 0) -> ChatBackend:
    if config.kind == "openai":
        return OpenAIChatBackend(config.base_url, config.model, os.environ.get(config.api_key_env),
                                 config.concurrency, config.requests_per_second, config.timeout,
                                 config.max_retries, config.backoff)
    return TransformersChatBackend(config.model, config.batch_size, config.threads, seed=seed)
