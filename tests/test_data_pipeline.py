"""The resumable pipeline: crash and resume, kill -9 and resume, sharding, the manifest."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from llama_omni.data.chat_server import make_server
from llama_omni.data.config import DataConfig
from llama_omni.data.llm_backends import ChatBackend
from llama_omni.data.manifest import read_manifest
from llama_omni.data.pipeline import Pipeline
from llama_omni.data.state import Shard
from llama_omni.data.steps import SynthesizeStep

QUESTIONS = ["What makes the sky blue?", "How do bees make honey?", "Why do cats purr?",
             "What is a good name for a goldfish?", "How far away is the moon?",
             "Why do leaves change color in autumn?", "What should I cook tonight?",
             "How do I keep my plants alive?", "What is the tallest mountain on earth?",
             "Why is the ocean salty?", "How do airplanes stay in the air?",
             "What does a lighthouse keeper do?"]


class EchoLLM(ChatBackend):
    """A fast stand-in LLM that answers both prompts in their JSON format."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def chat(self, conversations, max_new_tokens, temperature=0.0):
        time.sleep(self.delay * len(conversations))
        replies = []
        for messages in conversations:
            question = messages[-1]["content"]
            if '"instruction"' in messages[0]["content"]:
                replies.append(json.dumps({"instruction": f"Um, {question[0].lower()}{question[1:]}"}))
            else:
                replies.append(json.dumps({"response": f"Here is a short answer about "
                                                       f"{question.split()[-1].strip('?')}. I hope it helps."}))
        return replies


def _config(tmp_path: Path, **changes) -> DataConfig:
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "instruction": q}) + "\n"
                              for i, q in enumerate(QUESTIONS)))
    data = {"out": str(tmp_path / "ds"), "batch_size": 2,
            "source": {"kind": "jsonl", "path": str(source)},
            "rewrite": {"retries": 0}, "respond": {"retries": 0},
            "synthesize": {"instruction_voices": ["flite:slt", "flite:kal16", "espeak-ng:en-us+f2"],
                           "response_voice": "flite:awb", "workers": 1}}
    data.update(changes)
    return DataConfig.from_dict(data)


def _log_ids(root: Path, step: str) -> list[str]:
    ids = []
    for path in (root / "state" / step).glob("*.jsonl"):
        ids += [json.loads(line)["id"] for line in path.read_text().splitlines()]
    return ids


def _check_complete(root: Path, steps=("rewrite", "respond", "synthesize")) -> list[dict]:
    for step in steps:
        ids = _log_ids(root, step)
        assert sorted(ids) == sorted(set(ids)) and len(ids) == len(QUESTIONS), step
    items = list(read_manifest(root))
    assert sorted(i["id"] for i in items) == sorted(f"q{i}" for i in range(len(QUESTIONS)))
    for item in items:
        for turn in item["turns"]:
            audio, rate = sf.read(root / turn["audio"])
            assert rate == 16000 and audio.ndim == 1 and len(audio) > 1600
    assert not [p for p in root.rglob(".*.tmp*")], "temp files left behind"
    return items


def test_crash_mid_step_then_resume_does_each_item_once(tmp_path, monkeypatch):
    config = _config(tmp_path)
    root = Path(config.out)
    calls = {"n": 0}
    real = SynthesizeStep._one

    def crashing(self, view):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real(self, view)

    monkeypatch.setattr(SynthesizeStep, "_one", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pipeline(config, llm=EchoLLM(), progress=False, log=lambda _: None).run()
    assert len(_log_ids(root, "synthesize")) == 4  # two batches of two were logged
    # what a kill -9 can leave: a half-written audio temp file and a cut log line
    (root / "audio" / "response" / ".q9.flac.tmp-shard-00000-of-00001").write_bytes(b"fLaC\0")
    with open(root / "state" / "synthesize" / "shard-00000-of-00001.jsonl", "a") as log:
        log.write('{"id": "q5", "ok": tr')
    monkeypatch.setattr(SynthesizeStep, "_one", real)
    report = Pipeline(config, llm=EchoLLM(), progress=False, log=lambda _: None).run()
    items = _check_complete(root)
    assert report["manifest"]["items"] == len(QUESTIONS) == len(items)
    assert report["steps"]["rewrite"]["methods"] == {"llm_json": len(QUESTIONS)}
    assert items[0]["turns"][0]["text"] == "Um, what makes the sky blue?"
    assert items[0]["original"]["instruction"] == QUESTIONS[0]
    assert {i["turns"][0]["voice"] for i in items} <= {"flite:slt", "flite:kal16", "espeak-ng:en-us+f2"}
    assert report["audio_hours"]["instruction"] > 0


def test_shards_split_the_items_and_share_a_directory(tmp_path):
    config = _config(tmp_path)
    first = Pipeline(config, Shard.parse("0/2"), llm=EchoLLM(), progress=False,
                     log=lambda _: None).run()
    assert first["manifest"]["items"] == len(QUESTIONS) // 2
    Pipeline(config, Shard.parse("1/2"), llm=EchoLLM(), progress=False, log=lambda _: None).run()
    logs = sorted(p.name for p in (Path(config.out) / "state" / "rewrite").glob("*.jsonl"))
    assert logs == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    _check_complete(Path(config.out))
    with pytest.raises(ValueError, match="i/n"):
        Shard.parse("2/2")


def test_other_selection_in_the_same_directory_is_refused(tmp_path):
    config = _config(tmp_path)
    Pipeline(config, llm=EchoLLM(), progress=False, log=lambda _: None).run(("rewrite",))
    other = config.replace(filters=config.filters.replace(min_words=5))
    with pytest.raises(ValueError, match="another source/filters config"):
        Pipeline(other, llm=EchoLLM(), progress=False, log=lambda _: None).run(("rewrite",))


def test_a_larger_limit_grows_the_data_set_and_keeps_finished_items(tmp_path):
    quiet = {"llm": EchoLLM(), "progress": False, "log": lambda _: None}
    small = _config(tmp_path, source={"kind": "jsonl", "path": str(tmp_path / "questions.jsonl"),
                                      "limit": 5})
    Pipeline(small, **quiet).run(("rewrite",))
    first = (Path(small.out) / "items.jsonl").read_text()
    assert sorted(_log_ids(Path(small.out), "rewrite")) == sorted(f"q{i}" for i in range(5))
    grown = small.replace(source=small.source.replace(limit=None))
    Pipeline(grown, **quiet).run(("rewrite",))
    assert (Path(small.out) / "items.jsonl").read_text().startswith(first)
    ids = _log_ids(Path(small.out), "rewrite")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == len(QUESTIONS)  # each done once
    assert json.loads((Path(small.out) / "selection.json").read_text())["selected"] == len(QUESTIONS)
    with pytest.raises(ValueError, match="smaller limit"):
        Pipeline(small, **quiet).run(("rewrite",))

@pytest.fixture()
def units_model(tmp_path):
    """A units model on Whisper base layer 1 with random centroids (real features, tiny K)."""
    from llama_omni.units.extract import UnitsConfig, save_units_model
    from llama_omni.units.kmeans import KMeansCodebook

    directory = tmp_path / "units-test"
    centroids = np.random.default_rng(0).normal(size=(8, 512)).astype(np.float32)
    save_units_model(UnitsConfig("packaged:whisper-base", 1, 8), KMeansCodebook(centroids), directory)
    return directory


@pytest.mark.slow  # eight CLI processes (about two minutes on a busy two-core machine)
def test_kill_9_in_each_step_then_resume(tmp_path, units_model):
    """Each step's command is killed with SIGKILL once it has logged some items, then rerun."""
    server = make_server(EchoLLM(delay=0.15), "echo")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        config = _config(tmp_path, llm={"kind": "openai", "model": "echo", "max_retries": 0,
                                        "base_url": f"http://{host}:{port}/v1", "concurrency": 1},
                         units={"model": str(units_model)})
        config_file = tmp_path / "config.yaml"
        config_file.write_text(json.dumps(config.to_dict()))  # JSON is YAML
        cli = str(Path(sys.executable).parent / "llama-omni")
        root = Path(config.out)
        for step in ("rewrite", "respond", "synthesize", "units"):
            process = subprocess.Popen([cli, "data", step, str(config_file)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 90
            while not _log_ids(root, step) and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            assert 0 < len(_log_ids(root, step)) < len(QUESTIONS), f"{step} was not killed mid-way"
            done = subprocess.run([cli, "data", step, str(config_file)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        items = _check_complete(root, ("rewrite", "respond", "synthesize", "units"))
        assert all(i["turns"][1]["units_model"] == "units-test" and i["turns"][1]["units"]
                   for i in items)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # starts a local Ray cluster
def test_ray_executor(tmp_path):
    ray = pytest.importorskip("ray")
    config = _config(tmp_path, synthesize={"instruction_voices": ["flite:slt"],
                                           "response_voice": "flite:awb", "workers": 2})
    Pipeline(config, llm=EchoLLM(), progress=False, log=lambda _: None).run(("rewrite", "respond"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        Pipeline(config.replace(executor="ray"), progress=False, log=lambda _: None).run(
            ("synthesize",))
    finally:
        ray.shutdown()
    _check_complete(Path(config.out))
