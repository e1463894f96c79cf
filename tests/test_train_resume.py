"""Exact resume: a run killed with SIGKILL and resumed equals an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.model.checkpoint import load_model
from llama_omni.train.checkpoints import checkpoint_dirs
from llama_omni.train.export import export_run
from llama_omni.train.run import train
from train_helpers import one_thread, save_small_vocab_llm, tiny_config, write_manifest  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "llama-omni"


@pytest.fixture(scope="module")
def small_llm_dir(tmp_path_factory):
    return save_small_vocab_llm(tmp_path_factory.mktemp("small-llm"))


def final_tensors(run: Path, final: str = "final") -> dict[str, torch.Tensor]:
    """Every weight of the exported model (adaptor, decoder, and the LLM when embedded)."""
    tensors = {f"omni.{k}": v for k, v in load_file(run / final / "model.safetensors").items()}
    for shard in sorted((run / final / "llm").glob("*.safetensors")):
        tensors.update({f"llm.{k}": v for k, v in load_file(shard).items()})
    return tensors


def assert_same_weights(a: Path, b: Path, final: str = "final") -> None:
    ta, tb = final_tensors(a), final_tensors(b, final)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=1e-6, rtol=0, msg=name)


def logged_steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, small_llm_dir):
    """Stage 1 with LoRA dropout (RNG), accumulation (2 micro-batches) and several epochs.

    The killed run is a real process; resuming it and the uninterrupted reference run use
    the same CLI command in this process (one thread in both)."""
    data = write_manifest(tmp_path / "data", items=4)
    steps = 30

    def command(run: Path) -> list[str]:
        return [
            str(CLI), "train", "stage1", str(REPO / "configs/train/tiny-stage1.yaml"),
            "--data", str(data), "--output-dir", str(run), "--tuning", "lora",
            "--max-steps", str(steps), "--set", f"model.base_dir={small_llm_dir}",
            "--set", "model.overrides.llm.prompt_style=chat-template",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "save_every=4",
            "--set", "lora.dropout=0.2", "--set", "optim.lr=3e-3",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        done = checkpoint_dirs(killed)
        if done and int(done[-1].name.split("-")[1]) >= 8:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    last = int(checkpoint_dirs(killed)[-1].name.split("-")[1])
    assert 8 <= last < steps and not (killed / "final").exists()

    resumed = CliRunner().invoke(app, command(killed)[1:])  # the same command, in this process
    assert resumed.exit_code == 0, resumed.output[-3000:]
    events = logged_steps(killed)
    resume = next(e for e in events if e.get("event") == "resume")
    assert resume["checkpoint"] == f"step-{resume['step']:08d}" and resume["step"] >= last
    after = [e["step"] for e in events[events.index(resume):] if "loss" in e]
    assert after == list(range(resume["step"] + 1, steps + 1))

    straight = tmp_path / "straight"
    result = CliRunner().invoke(app, command(straight)[1:])
    assert result.exit_code == 0, result.output[-3000:]
    assert_same_weights(killed, straight)


@pytest.mark.parametrize("stage, grouped", [
    ("stage2", False), ("stage2", True), ("stage1", False), ("align", False),
])
def test_resume_from_a_checkpoint_equals_uninterrupted(tmp_path, small_llm_dir, stage, grouped):
    """In process: restart from the step-4 checkpoint of a run and finish it again."""
    data = write_manifest(tmp_path / "data", items=3)
    values = {"model.overrides": {"llm": {"prompt_style": "chat-template"}}, "max_steps": 8,
              "save_every": 4, "keep_checkpoints": 5, "data.group_by_length": grouped}
    straight = tiny_config(tmp_path / "a", small_llm_dir, data, stage, **values)
    train(straight)
    resumed = tiny_config(tmp_path / "b", small_llm_dir, data, stage, **values)
    run = Path(resumed.output_dir)
    shutil.copytree(Path(straight.output_dir) / "checkpoints/step-00000004",
                    run / "checkpoints/step-00000004")
    train(resumed)
    assert next(e for e in logged_steps(run) if e.get("event") == "resume")["step"] == 4
    assert_same_weights(Path(straight.output_dir), run)
    losses = [[e["loss"] for e in logged_steps(r) if "loss" in e and e["step"] > 4]
              for r in (Path(straight.output_dir), run)]
    assert losses[0] == losses[1]
    exported = export_run(run, tmp_path / "exported")  # `llama-omni train export`: the latest
    assert_same_weights(run, exported.parent, final=exported.name)


@pytest.mark.slow
def test_two_processes_train_and_resume(tmp_path, small_llm_dir):
    """DDP over gloo with two CPU processes: sharded caching, accumulation, resume."""
    data = write_manifest(tmp_path / "data", items=4)
    run = tmp_path / "run"

    def command(steps: int) -> list[str]:
        return [
            str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(CLI),
            "train", "stage1", str(REPO / "configs/train/tiny-stage1.yaml"), "--data", str(data),
            "--output-dir", str(run), "--tuning", "lora", "--max-steps", str(steps),
            "--batch-size", "4", "--set", f"model.base_dir={small_llm_dir}",
            "--set", "model.overrides.llm.prompt_style=chat-template",
            "--set", f"data.cache_dir={tmp_path / 'cache'}",
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    for steps in (4, 6):
        result = subprocess.run(command(steps), env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    events = logged_steps(run)
    assert [e["processes"] for e in events if e.get("event") == "start"] == [2, 2]
    assert next(e for e in events if e.get("event") == "resume")["step"] == 4
    assert (run / "checkpoints/step-00000006/random_states_1.pkl").is_file()


def test_export_after_a_lora_checkpoint_keeps_its_adapter(tmp_path, small_llm_dir):
    """Stage 2 from a checkpoint whose LLM is a reference plus lora/: the export's LLM is
    the tuned one the run trained on, not the bare base."""
    data = write_manifest(tmp_path / "data", items=3)
    chat = {"model.overrides": {"llm": {"prompt_style": "chat-template"}}}
    stage1 = tiny_config(tmp_path / "a", small_llm_dir, data, "stage1", tuning="lora",
                         **{**chat, "max_steps": 2})
    train(stage1)
    tuned = export_run(stage1.output_dir, tmp_path / "stage1-export", merge=False)
    assert (tuned / "lora").is_dir()
    stage2 = tiny_config(tmp_path / "b", small_llm_dir, data, "stage2", max_steps=2,
                         **{"model.preset": None, "model.checkpoint": str(tuned)})
    train(stage2)
    expected = load_model(tuned).llm.state_dict()
    final = Path(stage2.output_dir) / "final"  # exported at the end of the run
    for exported in (final, export_run(stage2.output_dir, tmp_path / "stage2-export")):
        got = load_model(exported).llm.state_dict()
        assert expected.keys() == got.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, msg=f"{exported}: {name}")
