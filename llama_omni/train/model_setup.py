"""The model a run trains: built from a preset or a checkpoint, LoRA, and which parameters train.

Stage 1 trains the adaptor and the LLM side: the whole LLM ("full"), LoRA adapters on it
("lora", the base weights frozen) or nothing of it ("adaptor"). Stage 2 trains the
speech decoder only; the optional align stage, the adaptor only. The encoder is frozen
in all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.train.config import LoraSpec, ModelSpec, TrainConfig

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(spec: ModelSpec, device: torch.device | str | None = None) -> OmniModel:
    """The starting model; its trainable parts are set later by `set_trainable`."""
    from llama_omni.model.checkpoint import load_model

    dtype = TORCH_DTYPES[spec.dtype]
    if spec.preset is not None:
        config = OmniConfig.from_dict(_merge(OmniConfig.preset(spec.preset).to_dict(), spec.overrides))
        return OmniModel.initialize(config, base_dir=spec.base_dir, device=device, dtype=dtype)
    model = load_model(spec.checkpoint, device=device, dtype=dtype)
    if "speech_decoder" in spec.overrides:
        decoder, kept = model.speech_decoder.reconfigured(**spec.overrides["speech_decoder"])
        log.info("speech decoder config changed, %s: %s",
                 "weights kept" if kept else "starting fresh", decoder.config)
        model.config = model.config.replace(speech_decoder=decoder.config)
        model.speech_decoder = decoder
    return model


def model_base_dir(spec: ModelSpec) -> Path | None:
    """The directory relative LLM sources of this model resolve against."""
    if spec.checkpoint is not None:
        return Path(spec.checkpoint)
    return Path(spec.base_dir) if spec.base_dir else None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            if key not in out:
                raise ValueError(
                    f"model.overrides: {key!r} is not an OmniConfig field here; known: {sorted(out)}"
                )
            out[key] = value
    return out


def apply_lora(model: OmniModel, spec: LoraSpec) -> None:
    """Wrap the LLM backbone with peft LoRA adapters (in place)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("tuning 'lora' needs peft: pip install 'peft>=0.13'") from None
    lora = LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules), task_type="CAUSAL_LM",
    )
    model.llm.model = get_peft_model(model.llm.model, lora)


def has_lora(model: OmniModel) -> bool:
    return any("lora_" in name for name, _ in model.llm.named_parameters())


def merge_lora(model: OmniModel) -> None:
    """Fold the LoRA adapters into the LLM weights and drop the peft wrapper (in place)."""
    model.llm.model = model.llm.model.merge_and_unload()


def set_trainable(model: OmniModel, stage: str, tuning: str = "full") -> list[str]:
    """Freeze everything, then unfreeze what this stage trains; returns the trainable names."""
    model.requires_grad_(False)
    if stage == "stage2":
        model.speech_decoder.requires_grad_(True)
    elif stage == "align":
        model.adaptor.requires_grad_(True)
    else:
        model.adaptor.requires_grad_(True)
        if tuning == "full":
            model.llm.requires_grad_(True)
        elif tuning == "lora":
            if not has_lora(model):
                raise ValueError("tuning 'lora' needs apply_lora(model, ...) first")
            for name, param in model.llm.named_parameters():
                param.requires_grad_("lora_" in name)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def prepare_model(config: TrainConfig, device: torch.device | str | None = None) -> OmniModel:
    """The run's starting model, with LoRA (if any) and its trainable parameters set.

    Seeded, so fresh parts (adaptor, decoder, a random test encoder) come out the same in
    every process and every rerun: a resumed run and an export rebuild the same model.
    """
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model = build_model(config.model, device=device)
    if config.stage == "stage1" and config.tuning == "lora":
        apply_lora(model, config.lora)
    set_trainable(model, config.stage, config.tuning)
    return model


def llm_trained(config: TrainConfig) -> bool:
    return config.stage == "stage1" and config.tuning in ("full", "lora")
