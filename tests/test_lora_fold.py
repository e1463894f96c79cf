"""fold_lora: peft-format adapters folded into plain weights, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from llama_omni.errors import CheckpointError
from llama_omni.model.lora import fold_lora


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)


def write_adapter(path, tensors, **config):
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))


def test_fold_adds_scaled_low_rank_update(tmp_path):
    model = Tiny()
    before = model.proj.weight.detach().clone()
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    write_adapter(tmp_path / "lora", {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b})
    assert fold_lora(model, tmp_path / "lora") == 1
    torch.testing.assert_close(model.proj.weight.detach(), before + 2.0 * b @ a)


def test_fold_names_a_target_the_model_lacks(tmp_path):
    write_adapter(tmp_path / "lora", {"base_model.model.other.lora_A.weight": torch.zeros(2, 4),
                                      "base_model.model.other.lora_B.weight": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="other"):
        fold_lora(Tiny(), tmp_path / "lora")


def test_fold_refuses_settings_it_cannot_apply(tmp_path):
    write_adapter(tmp_path / "lora", {"base_model.model.proj.lora_A.weight": torch.zeros(2, 4),
                                      "base_model.model.proj.lora_B.weight": torch.zeros(3, 2)},
                  use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        fold_lora(Tiny(), tmp_path / "lora")
