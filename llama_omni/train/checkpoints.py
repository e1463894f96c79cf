"""Training checkpoints: `output_dir/checkpoints/step-NNNNNNNN/`, written whole or not at all.

A checkpoint is accelerate's saved state (weights, optimizer, scheduler, RNG of every
process) plus our `Progress` (optimizer step, epoch, batches consumed in that epoch). It
is written to a temporary directory and renamed when complete, so a run killed while
saving leaves the previous checkpoint as the latest. Without DeepSpeed or FSDP only the
trainable parameters are stored: an adaptor-only or LoRA checkpoint of an 8B model is
megabytes, not 16 GB.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from llama_omni.model.checkpoint import CheckpointError

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"  # accelerate's name for the first model's weights
_NAME = re.compile(r"step-(\d{8})")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches: int = 0  # micro-batches of `epoch` already consumed by this process

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches = state["step"], state["epoch"], state["batches"]


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int) -> Path:
    """Save the training state atomically, then keep only the newest `keep` checkpoints."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial(output_dir: str | Path) -> None:
    """Delete temporary directories a killed run left behind."""
    for tmp in (Path(output_dir) / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def store_trainable_only(accelerator: Accelerator) -> None:
    """Make save_state/load_state store only parameters that require gradients."""

    def on_save(models: list[nn.Module], weights: list[dict], _output_dir: str) -> None:
        for model, state in zip(models, weights):
            keep = {name for name, p in model.named_parameters() if p.requires_grad}
            for name in [n for n in state if n not in keep]:
                del state[name]

    def on_load(models: list[nn.Module], input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            load_trainable(model, Path(input_dir) / (WEIGHTS if i == 0 else WEIGHTS.replace(".", f"_{i}.")))
            models.remove(model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load a trainable-only weights file: its names must be exactly the trainable ones."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a DeepSpeed/FSDP checkpoint has its own layout)")
    tensors = load_file(path)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        raise CheckpointError(
            f"{path}: stored parameters do not match the trainable ones (missing "
            f"{sorted(expected - set(tensors))[:5]}, unexpected "
            f"{sorted(set(tensors) - expected)[:5]}); was the run's stage or tuning changed?"
        )
    model.load_state_dict(tensors, strict=False)  # exactly the trainable set, checked above
