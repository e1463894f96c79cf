"""Shared fixtures: tiny models with real numerics, built at test time."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llama_omni import packaged
from llama_omni.model.omni import OmniConfig, OmniModel


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (width 64) with the real Llama-3.1 tokenizer, as a HF directory."""
    root = tmp_path_factory.mktemp("tiny-llm")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128256, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009], max_position_embeddings=4096,
    )
    LlamaForCausalLM(config).save_pretrained(root / "llm")
    AutoTokenizer.from_pretrained(packaged.llama31_tokenizer_dir()).save_pretrained(root / "llm")
    return root


@pytest.fixture()
def tiny_model(tiny_llm_dir) -> OmniModel:
    torch.manual_seed(0)
    return OmniModel.initialize(OmniConfig.preset("tiny-test"), base_dir=tiny_llm_dir).eval()
