"""Load test of `llama-omni serve`: concurrent WebSocket sessions, several spoken turns each.

Starts the server on 127.0.0.1 (or uses --url), runs N sessions x T turns of the
packaged example questions through the Realtime API at once, samples the server's
resident memory, and prints one JSON report: errors, latency percentiles (client side,
from the commit to the first text / first audio / response.done), turns per second,
the server's own metrics and peak RSS.

Model: --model DIR, else the installed default model, else the `small` preset
(packaged SmolLM2-135M + Whisper base, fresh adaptor and speech decoder) built once
under --workdir, with the packaged vocoder when one is installed.

    python bench/serve_load.py --sessions 8 --turns 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import websockets

from llama_omni.audio import load_audio
from llama_omni.serve.metrics import percentiles

EXAMPLES = Path(__file__).parents[1] / "llama_omni" / "serve" / "static" / "examples"


def build_small_model(workdir: Path) -> tuple[Path, Path | None]:
    """The `small` preset saved once under workdir (seeded), and a vocoder for its units."""
    import torch

    from llama_omni.inference.defaults import DEFAULT_VOCODER_DIR
    from llama_omni.model.checkpoint import save_checkpoint
    from llama_omni.model.omni import OmniConfig, OmniModel
    from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, load_vocoder, save_vocoder

    model_dir, vocoder_dir = workdir / "small-model", workdir / "vocoder"
    if DEFAULT_VOCODER_DIR.is_dir():
        vocoder_dir = DEFAULT_VOCODER_DIR
    elif not vocoder_dir.is_dir():
        torch.manual_seed(1)
        save_vocoder(UnitVocoder(VocoderConfig.preset("istft-256")), vocoder_dir)
    if not model_dir.is_dir():
        units = load_vocoder(vocoder_dir).config.num_units
        config = OmniConfig.preset("small")
        config = config.replace(speech_decoder=config.speech_decoder.replace(unit_vocab=units))
        torch.manual_seed(0)
        save_checkpoint(OmniModel.initialize(config), model_dir)
    return model_dir, vocoder_dir


def start_server(model: Path, vocoder: Path | None, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = Path(sys.executable).with_name("llama-omni")  # the console script of this environment
    command = [
        str(entry),
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if vocoder is not None:
        command += ["--vocoder", str(vocoder)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the server did not answer /health within 10 minutes")


class MemoryWatch:
    """Samples a process tree's resident memory on a thread; keeps the peak."""

    def __init__(self, pid: int | None):
        self.process = psutil.Process(pid) if pid else None
        self.start_mb = self.peak_mb = self.now()
        self.samples: list[tuple[float, float]] = []  # (perf_counter time, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float | None:
        if self.process is None:
            return None
        try:
            procs = [self.process, *self.process.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs) / 2**20
        except psutil.Error:
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = self.now()
            if rss is not None:
                self.peak_mb = max(self.peak_mb or 0, rss)
                self.samples.append((time.perf_counter(), rss))

    def peak_between(self, start: float, end: float) -> float | None:
        seen = [mb for t, mb in self.samples if start <= t <= end]
        return _round(max(seen)) if seen else None

    def stop(self, finish_times: list[float]) -> dict:
        """start / peak / end MiB, and the peak up to each quarter of the finished turns."""
        self._stop.set()
        self._thread.join()
        quarters = {}
        for q in (1, 2, 3, 4):
            if finish_times and self.samples:
                until = sorted(finish_times)[max(0, len(finish_times) * q // 4 - 1)]
                seen = [mb for t, mb in self.samples if t <= until]
                quarters[f"peak_by_{25 * q}pct_turns"] = _round(max(seen)) if seen else None
        return {
            "start": _round(self.start_mb),
            "peak": _round(self.peak_mb),
            "end": _round(self.now()),
            **quarters,
        }


def _round(x):
    return None if x is None else round(x, 1)


async def session(
    url: str, questions: list[str], turns: int, max_new_tokens: int, results: list
) -> None:
    """One client: `turns` spoken turns on one connection; one result dict per turn."""
    async with websockets.connect(
        url.replace("http", "ws", 1) + "/v1/realtime", max_size=None
    ) as ws:
        await ws.send(
            json.dumps({"type": "session.update", "session": {"max_output_tokens": max_new_tokens}})
        )
        for turn in range(turns):
            for piece in questions[turn % len(questions)]:
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": piece}))
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            results.append(await _answer(ws, sent))


async def _answer(ws, sent: float) -> dict:
    """Events up to response.done (or an error before response.created: no answer comes)."""
    result = {"first_text_ms": None, "first_audio_ms": None, "errors": []}
    created = False
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout=600))
        ms = (time.perf_counter() - sent) * 1000
        kind = event["type"]
        created = created or kind == "response.created"
        if kind == "error":
            result["errors"].append(event["error"]["message"])
            if not created:
                return result
        elif kind == "response.output_text.delta" and result["first_text_ms"] is None:
            result["first_text_ms"] = ms
        elif kind == "response.output_audio.delta" and result["first_audio_ms"] is None:
            result["first_audio_ms"] = ms
        elif kind == "response.done":
            result.update(
                finished=time.perf_counter(),
                total_ms=ms,
                status=event["response"]["status"],
                audio_s=event["response"]["audio_seconds"],
            )
            return result


def pcm_pieces(path: Path, seconds: float = 0.5) -> list[str]:
    audio = load_audio(path)
    step = int(16000 * seconds)
    return [
        base64.b64encode(
            (np.clip(audio[i : i + step], -1, 1) * 32767).astype("<i2").tobytes()
        ).decode()
        for i in range(0, audio.size, step)
    ]


async def run(
    url: str, sessions: int, turns: int, max_new_tokens: int, time_limit_s: float
) -> tuple[list, list, float]:
    """All sessions at once; sessions still running after `time_limit_s` are stopped."""
    questions = [pcm_pieces(p) for p in sorted(EXAMPLES.glob("*.flac"))]
    results: list[dict] = []
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(
            session(url, questions[i:] + questions[:i], turns, max_new_tokens, results)
        )
        for i in range(sessions)
    ]
    done, late = await asyncio.wait(tasks, timeout=time_limit_s)
    for task in late:
        task.cancel()
    failures = [f"{type(t.exception()).__name__}: {t.exception()}" for t in done if t.exception()]
    failures += [f"stopped after the {time_limit_s:.0f} s time limit"] * len(late)
    return results, failures, time.perf_counter() - started


def report(
    results: list, failures: list, wall_s: float, memory: dict, server_metrics: dict, args
) -> dict:
    def stats(key):
        return percentiles(np.array([r[key] for r in results if r.get(key) is not None]))

    errors = [e for r in results for e in r["errors"]] + failures
    return {
        "sessions": args.sessions,
        "turns_per_session": args.turns,
        "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens,
        "turns_done": len(results),
        "errors": len(errors),
        "error_samples": errors[:5],
        "statuses": {
            s: sum(r.get("status") == s for r in results)
            for s in {r.get("status") for r in results}
        },
        "latency_ms": {key: stats(key) for key in ("first_text_ms", "first_audio_ms", "total_ms")},
        "audio_seconds": round(sum(r.get("audio_s", 0) for r in results), 1),
        "wall_s": round(wall_s, 1),
        "turns_per_s": round(len(results) / wall_s, 3),
        "server_rss_mb": memory,
        "server": {
            k: server_metrics.get(k)
            for k in ("batches", "batched_turns", "prompt_positions", "latency_ms", "sessions")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--vocoder", type=Path)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "llama-omni-serve-bench",
    )
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--time-limit", type=float, default=5400, help="seconds for all turns")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the sessions x turns this many times on one server (fresh sessions each "
        "round): equal peaks per round show that memory is bounded, not leaking",
    )
    args = parser.parse_args()

    server, url = None, args.url
    if url is None:
        from llama_omni.inference.defaults import default_model_dir

        args.workdir.mkdir(parents=True, exist_ok=True)
        model, vocoder = args.model or default_model_dir(), args.vocoder
        if model is None:
            model, vocoder = build_small_model(args.workdir)
        server, url = start_server(model, vocoder, args.workdir / "server.log")
    memory = MemoryWatch(server.pid if server else None)
    results: list[dict] = []
    failures: list[str] = []
    round_peaks: list[float | None] = []
    wall_s = 0.0
    try:
        for _ in range(args.rounds):
            started = time.perf_counter()
            done, failed, seconds = asyncio.run(
                run(url, args.sessions, args.turns, args.max_new_tokens, args.time_limit)
            )
            results, failures, wall_s = results + done, failures + failed, wall_s + seconds
            round_peaks.append(memory.peak_between(started, time.perf_counter()))
        server_metrics = json.load(urllib.request.urlopen(url + "/metrics", timeout=10))
    finally:
        rss = memory.stop([r["finished"] for r in results if "finished" in r])
        rss["peak_by_round"] = round_peaks
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(report(results, failures, wall_s, rss, server_metrics, args), indent=2))


if __name__ == "__main__":
    main()
