"""Helpers and fixtures for the inference tests (engine, vocoder streaming, chat CLI).

A test module uses a fixture by importing its `*_fixture` function (pytest registers
it under the fixture's name); `one_thread` applies to every test of such a module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_omni.inference.engine import Engine, EngineOptions
from llama_omni.model.llm import SpeechLLM
from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig


@pytest.fixture(name="one_thread", autouse=True)
def one_thread_fixture():
    """Tiny tensors run fastest on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="tiny_vocoder")
def tiny_vocoder_fixture() -> UnitVocoder:
    """A random vocoder for the tiny-test model's 32 units."""
    torch.manual_seed(1)
    return UnitVocoder(VocoderConfig.preset("tiny-test")).eval()


@pytest.fixture(name="tiny_omni", scope="module")
def tiny_omni_fixture(tiny_llm_dir) -> OmniModel:
    """The conftest's tiny_model (same seed), built once per module: tests must not change it."""
    torch.manual_seed(0)
    return OmniModel.initialize(OmniConfig.preset("tiny-test"), base_dir=tiny_llm_dir).eval()


def tone(seconds: float, hz: float, seed: int = 0) -> np.ndarray:
    """A noisy sine at 16 kHz: different inputs give the tiny model different answers."""
    t = np.arange(int(16000 * seconds)) / 16000
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
    return (0.5 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def engine(model, vocoder=None, **options) -> Engine:
    options.setdefault("max_new_tokens", 12)
    return Engine(model, vocoder, EngineOptions(**options))


def with_stop_ids(model: OmniModel, stop_ids: tuple[int, ...]) -> OmniModel:
    """The same model with other stop tokens (to stop requests of a batch at other steps)."""
    llm = model.llm
    llm = SpeechLLM(llm.model, llm.tokenizer, llm.config.replace(stop_token_ids=stop_ids))
    return OmniModel(model.config, model.encoder, llm, model.adaptor, model.speech_decoder).eval()
