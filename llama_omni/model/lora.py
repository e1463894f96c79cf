"""Fold a LoRA adapter, as peft saves it, into a Hugging Face model's weights (no peft).

A checkpoint whose LLM is a packaged backbone plus a small adapter ships only the
adapter (`lora/`): folding W += scale * B @ A when loading gives the tuned LLM without
storing its full weights and without needing peft at run time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llama_omni.errors import CheckpointError

LORA_SUBDIR = "lora"  # where a llama-omni checkpoint directory keeps an adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def fold_lora(model: nn.Module, adapter_dir: str | Path) -> int:
    """Add the adapter's low-rank updates to `model`'s weights in place; returns how many."""
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{adapter_dir}: unreadable LoRA adapter ({err})") from None
    _check_supported(config, adapter_dir)
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    params = dict(model.named_parameters())
    targets = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    if not targets:
        raise CheckpointError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no lora_A/lora_B pairs")
    with torch.no_grad():
        for target in targets:
            name = target.removeprefix(_PREFIX) + ".weight"
            down, up = tensors[f"{target}.lora_A.weight"], tensors.get(f"{target}.lora_B.weight")
            if name not in params or up is None:
                raise CheckpointError(
                    f"{adapter_dir}: adapter tensor {target!r} has no matching weight {name!r} "
                    "(or no lora_B); was it trained on another backbone?"
                )
            weight = params[name]
            delta = up.float() @ down.float()  # [out, r] @ [r, in] -> [out, in]
            if delta.shape != weight.shape:
                raise CheckpointError(
                    f"{adapter_dir}: update for {name} has shape {tuple(delta.shape)}, "
                    f"the weight {tuple(weight.shape)}"
                )
            weight.add_((scale * delta).to(weight.dtype))
    return len(targets)


def _check_supported(config: dict, adapter_dir: Path) -> None:
    problems = [
        f"{key}={config.get(key)!r}"
        for key, ok in (
            ("peft_type", config.get("peft_type", "LORA") == "LORA"),
            ("use_dora", not config.get("use_dora")),
            ("fan_in_fan_out", not config.get("fan_in_fan_out")),
            ("rank_pattern", not config.get("rank_pattern")),
            ("alpha_pattern", not config.get("alpha_pattern")),
            ("modules_to_save", not config.get("modules_to_save")),
        )
        if not ok
    ]
    if problems:
        raise CheckpointError(
            f"{adapter_dir}: adapter settings not supported when loading without peft: "
            f"{', '.join(problems)}; export with --merge-lora instead"
        )
