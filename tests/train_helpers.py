"""Tiny training data and configs for the tests of llama_omni.train (not collected by pytest)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni.train.config import TrainConfig

ANSWERS = ["Sure, it is sunny.", "The cat sleeps.", "Two plus two is four.", "Hello there!",
           "Yes, I can help.", "Water boils at one hundred degrees."]


def write_wav(path: Path, seconds: float, seed: int) -> Path:
    """Noise with a seed-dependent tone, 16 kHz mono, so every file has distinct features."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), 16000)
    return path


def write_manifest(root: Path, items: int = 4, *, turns: int = 1, units: bool = True,
                   unit_vocab: int = 32, seconds: float = 0.6,
                   transcripts: list[str] | None = None) -> Path:
    """A manifest directory in the data pipeline's format, with noise audio; the user
    turns' text is "question N", or transcripts[N % len] when given."""
    lines = []
    for i in range(items):
        conversation = []
        for t in range(turns):
            n = i * turns + t
            question = write_wav(root / "audio" / f"q{n}.wav", seconds + 0.1 * (n % 3), n)
            text = transcripts[n % len(transcripts)] if transcripts else f"question {n}"
            conversation.append({"role": "user", "text": text,
                                 "audio": str(question.relative_to(root)), "voice": "test"})
            answer = {"role": "assistant", "text": ANSWERS[n % len(ANSWERS)],
                      "audio": f"audio/a{n}.wav", "voice": "test"}
            if units:
                answer["units"] = word_units(answer["text"], unit_vocab)
                answer["units_model"] = "test"
            conversation.append(answer)
        lines.append(json.dumps({"id": f"item-{i}", "source": "test", "turns": conversation,
                                 "original": {}}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def word_units(text: str, unit_vocab: int) -> list[int]:
    """Units that follow the words, like speech: a leading-silence unit 0, then one unit
    per word (a stable hash of it)."""
    return [0] + [1 + zlib.crc32(w.encode()) % (unit_vocab - 1) for w in re.findall(r"\w+", text)]


def tiny_config(tmp: Path, llm_dir: Path, data: Path, stage: str = "stage1", **values) -> TrainConfig:
    """A config training the tiny-test preset for a few steps; `values` are dotted overrides."""
    base = {
        "stage": stage, "output_dir": str(tmp / f"run-{stage}"),
        "data.train": str(data), "data.cache_dir": str(tmp / "cache"), "data.eval_fraction": 0.0,
        "model.preset": "tiny-test", "model.base_dir": str(llm_dir),
        "batch_size": 2, "micro_batch_size": 1, "epochs": 50, "max_steps": 4,
        "log_every": 1, "eval_every": 1000, "save_every": 2, "tensorboard": False,
        "optim.lr": 1e-3, "optim.warmup_ratio": 0.0,
    }
    return TrainConfig.load(None, **{**base, **values})



CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_small_vocab_llm(directory: Path) -> Path:
    """A tiny Llama with a word-level ChatML tokenizer of a few hundred tokens.

    The real Llama-3.1 vocabulary (128K) makes every training step cost a large output
    layer; with this one the training tests run many steps in seconds.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llama_omni.model.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    texts = ANSWERS + [DEFAULT_SYSTEM_PROMPT, DEFAULT_INSTRUCTION, "system user assistant"]
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(vocab), eos_token_id=vocab["<|im_end|>"],
        bos_token_id=None, pad_token_id=None, max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(directory / "llm")
    tokenizer.save_pretrained(directory / "llm")
    return directory


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared, loaded CPU, thread contention makes tiny models
    tens of times slower. Import this fixture into a test module to apply it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
