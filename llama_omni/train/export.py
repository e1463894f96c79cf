"""Export a trained model as a llama-omni checkpoint directory (the foundation format).

- A trained LLM (stage 1 "full", or LoRA merged) is written into the checkpoint (`llm/`,
  source "embedded"), since its weights are no longer those of its source.
- LoRA not merged: the checkpoint names the base LLM by absolute path and the adapter is
  stored beside it in `lora/` (peft format); `load_model` folds it in (no peft needed).
- An LLM left untouched keeps its source (a packaged model stays a reference). If the run
  started from a checkpoint whose LLM is a reference plus `lora/` (folded in on load, e.g.
  stage 2 after a LoRA stage 1), that adapter is carried over, so the export's LLM is the
  one the run trained with.
"""

from __future__ import annotations

from pathlib import Path

from llama_omni.model.checkpoint import save_checkpoint
from llama_omni.model.llm import EMBEDDED_SOURCE, PACKAGED_LLMS, resolve_source
from llama_omni.model.lora import LORA_SUBDIR
from llama_omni.model.omni import OmniModel
from llama_omni.train import checkpoints
from llama_omni.train.align import AlignModule
from llama_omni.train.config import TrainConfig
from llama_omni.train.model_setup import (
    has_lora,
    llm_trained,
    merge_lora,
    model_base_dir,
    prepare_model,
)


def export_checkpoint(
    model: OmniModel,
    directory: str | Path,
    *,
    llm_trained: bool,
    merge: bool = True,
    base_dir: str | Path | None = None,
) -> Path:
    """Write `model` to `directory`; merging LoRA folds it into `model` in place."""
    directory = Path(directory)
    unmerged = has_lora(model) and not merge
    if has_lora(model) and merge:
        merge_lora(model)
    source = model.config.llm.source
    if llm_trained and not unmerged:
        source = EMBEDDED_SOURCE
    elif source in PACKAGED_LLMS or (source == EMBEDDED_SOURCE and not unmerged):
        pass  # still valid as it is: a packaged name, or the copy save_checkpoint writes
    else:  # a path (relative to where this model came from) or the base under a LoRA
        source = str(resolve_source(source, base_dir).resolve())
    config = model.config.replace(llm=model.config.llm.replace(source=source))
    view = OmniModel(config, model.encoder, model.llm, model.adaptor, model.speech_decoder)
    save_checkpoint(view, directory)
    if unmerged:
        model.llm.model.save_pretrained(directory / LORA_SUBDIR)
    return directory


def export_run(
    run_dir: str | Path, directory: str | Path, *, step: int | None = None, merge: bool = True
) -> Path:
    """Export a training checkpoint of a run (the latest, or the one at `step`)."""
    run_dir = Path(run_dir)
    config = TrainConfig.load(run_dir / "config.yaml")
    found = {int(p.name.split("-")[1]): p for p in checkpoints.checkpoint_dirs(run_dir)}
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no complete training checkpoint")
    if step is not None and step not in found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step}; have {sorted(found)}")
    chosen = found[step if step is not None else max(found)]
    model = prepare_model(config)
    # The align stage trains a CTC head beside the adaptor; it is read, then left out.
    trained = AlignModule.for_model(model) if config.stage == "align" else model
    checkpoints.load_trainable(trained, chosen / checkpoints.WEIGHTS)
    return export_trained(model, config, directory, merge=merge)


def export_trained(model: OmniModel, config: TrainConfig, directory: str | Path, *, merge: bool) -> Path:
    """Export the model a run with `config` trained (at its end, or from a checkpoint).

    An LLM that came with a folded `lora/` and was not trained keeps it (save_checkpoint
    stores it again); one trained further is written whole, unless LoRA stays unmerged,
    which would keep only the new adapter: refused.
    """
    folded = model.llm.folded_adapter
    if folded is not None and llm_trained(config) and not merge:
        raise ValueError(
            f"the run trained LoRA on top of the adapter of {folded.parent}; an unmerged "
            "export would keep only the new one: export with LoRA merged"
        )
    return export_checkpoint(
        model, directory, llm_trained=llm_trained(config), merge=merge,
        base_dir=model_base_dir(config.model),
    )
