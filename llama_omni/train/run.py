"""One training run end to end: data -> cached features (and states) -> trainer -> export.

    output_dir/
      config.yaml        the resolved config (what `llama-omni train export` rebuilds from)
      metrics.jsonl      one JSON line per log, evaluation and run event
      tensorboard/       when tensorboard is installed
      checkpoints/step-NNNNNNNN/
      final/             the trained model as a llama-omni checkpoint
      heldout-transcripts.json   align stage: what the adaptor carries (align.py)
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from accelerate import Accelerator, PartialState

from llama_omni.model.omni import OmniModel
from llama_omni.train import align
from llama_omni.train.batches import (
    SpeechTextCollator,
    SpeechTextDataset,
    SpeechTextExample,
    UnitDataset,
    collate_units,
    speech_text_examples,
)
from llama_omni.train.config import DataSpec, TrainConfig, cpu_bf16_support
from llama_omni.train.data import (
    Conversation,
    DataError,
    check_audio_exists,
    read_conversations,
    split_heldout,
)
from llama_omni.train.export import export_trained
from llama_omni.train.features import TensorCache, cache_encoder_features, encoder_namespace
from llama_omni.train.model_setup import TORCH_DTYPES, prepare_model
from llama_omni.train.stage1 import TEACHER, Stage1Module
from llama_omni.train.stage2 import (
    Stage2Module,
    cache_answer_states,
    states_namespace,
    unit_examples,
)
from llama_omni.train.trainer import StageData, Trainer, accumulation_steps

log = logging.getLogger(__name__)
FINAL = "final"


def train(config: TrainConfig) -> Path:
    """Train (resuming from the latest checkpoint of output_dir) and export; returns final/."""
    accelerator = make_accelerator(config)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
    model = prepare_model(config, device=accelerator.device)
    stage = build_stage(config, model)
    trainer = Trainer(config, accelerator, stage)
    trainer.resume()
    trainer.fit()
    state = accelerator.get_state_dict(trainer.module)  # gathered whole under ZeRO-3 / FSDP
    final = output_dir / FINAL
    if accelerator.is_main_process:
        if config.stage == "align":
            _report_transcripts(config, model, trainer, stage)
        # the stage module's own parts (align's CTC head, a distillation teacher) are not the model's
        helper = {"align": align.HEAD, "stage1": TEACHER}.get(config.stage)
        if helper is not None:
            state = {k: v for k, v in state.items() if not k.startswith(f"{helper}.")}
        # The stage module's parameter names are the model's; under ZeRO-3 / FSDP this puts
        # the gathered weights back into the (unsharded) model before export.
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"trained weights with unknown names: {unexpected[:5]}")
        export_trained(model, config, final, merge=config.merge_lora)
        log.info("exported the trained model to %s", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def build_stage(config: TrainConfig, model: OmniModel) -> StageData:
    """Read the data, fill the caches, and assemble the stage's module and datasets.

    Under several processes each one caches its share, then all wait for the others.
    """
    processes = PartialState()
    train_items, eval_items = load_conversations(config.data)
    dtype = TORCH_DTYPES[config.data.cache_dtype]
    features = TensorCache(
        config.data.cache_dir, encoder_namespace(model.encoder, model.config.encoder, dtype)
    )
    keys = _cache_features(model, config.data, train_items + eval_items, features, processes)
    if config.stage == "align":
        stage = _align(model, features, keys, train_items, eval_items)
        frozen = [model.encoder, model.llm, model.speech_decoder]
    else:
        examples = _examples(model, config, train_items + eval_items, keys, features)
        heldout = {c.id for c in eval_items}
        split = ([e for e in examples if e.id not in heldout],
                 [e for e in examples if e.id in heldout])
        if config.stage == "stage1":
            stage = _stage1(model, features, *split, distill=config.distill)
            frozen = [model.encoder, model.speech_decoder]
        else:
            stage = _stage2(model, config, features, *split, train_items + eval_items, processes)
            frozen = [model.encoder, model.adaptor, model.llm]
    # Parts whose outputs are cached wait on the CPU (for the export) instead of holding
    # accelerator memory: an 8B LLM would otherwise sit idle on every GPU during stage 2.
    for module in frozen:
        module.to("cpu")
    return stage


def make_accelerator(config: TrainConfig) -> Accelerator:
    tensorboard = config.tensorboard and importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        mixed_precision="bf16" if config.precision == "bf16" else "no",
        log_with="tensorboard" if tensorboard else None,
        project_dir=config.output_dir,
        step_scheduler_with_optimizer=False,
    )
    if config.precision == "bf16" and accelerator.device.type == "cpu" and cpu_bf16_support() is False:
        log.warning(
            "precision bf16 on a CPU without native bf16 instructions (no avx512_bf16 / "
            "amx_bf16 in /proc/cpuinfo): autocast emulates it and a step can be ~20x "
            "slower than fp32; use --precision fp32 on this machine"
        )
    # Known only now that the processes are counted (before prepare, as DeepSpeed needs).
    accelerator.gradient_accumulation_steps = accumulation_steps(config, accelerator.num_processes)
    if tensorboard:
        accelerator.init_trackers("tensorboard")
    return accelerator


def load_conversations(spec: DataSpec) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) conversations; every audio file is checked to exist."""
    items = read_conversations(spec.train, spec.audio_root)[: spec.max_items]
    if spec.eval is not None:
        train, heldout = items, read_conversations(spec.eval, spec.audio_root)[: spec.eval_max_items]
    else:
        train, heldout = split_heldout(items, spec.eval_fraction, spec.eval_max_items)
    if not train:
        raise DataError(f"{spec.train}: no training items")
    check_audio_exists(train + heldout)
    return train, heldout


def _cache_features(
    model: OmniModel,
    data: DataSpec,
    items: list[Conversation],
    features: TensorCache,
    processes: PartialState,
) -> dict[Path, str]:
    """Cache the encoder features of every item's audio; returns each file's cache key."""
    keys = cache_encoder_features(
        model.encoder, model.config.encoder, [(c.id, p) for c in items for p in c.audio], features,
        batch_size=data.encode_batch_size, dtype=TORCH_DTYPES[data.cache_dtype],
        shard=(processes.process_index, processes.num_processes),
        progress=processes.is_main_process,
    )
    processes.wait_for_everyone()
    return keys


def _examples(
    model: OmniModel,
    config: TrainConfig,
    items: list[Conversation],
    keys: dict[Path, str],
    features: TensorCache,
) -> list[SpeechTextExample]:
    """Tokenized stage-1/2 examples; items longer than data.max_length are dropped."""
    examples, too_long = speech_text_examples(
        items, model.llm.tokenizer, model.config.llm, keys, features,
        model.adaptor.config.downsample, config.data.max_length, with_written=config.distill > 0,
        written_system_prompt=config.distill_system_prompt,
    )
    if too_long:
        log.warning("skipped %d items longer than data.max_length=%d (e.g. %s)",
                    len(too_long), config.data.max_length, too_long[:3])
    return examples


def _stage1(
    model: OmniModel,
    features: TensorCache,
    train_ex: list[SpeechTextExample],
    eval_ex: list[SpeechTextExample],
    distill: float = 0.0,
) -> StageData:
    return StageData(
        module=Stage1Module(model.adaptor, model.llm, distill),
        train=SpeechTextDataset(train_ex, features),
        eval=SpeechTextDataset(eval_ex, features),
        collate=SpeechTextCollator(model.adaptor.config.downsample),
    )


def _align(
    model: OmniModel,
    features: TensorCache,
    keys: dict[Path, str],
    train_items: list[Conversation],
    eval_items: list[Conversation],
) -> StageData:

    def dataset(items: list[Conversation]) -> align.TranscriptDataset:
        kept, too_short = align.transcript_examples(
            items, model.llm.tokenizer, keys, features, model.adaptor.config.downsample)
        if too_short:
            log.warning("skipped %d spoken turns with more transcript tokens than adaptor "
                        "positions (e.g. %s)", len(too_short), too_short[:3])
        return align.TranscriptDataset(kept, features)

    return StageData(
        module=align.AlignModule.for_model(model),
        train=dataset(train_items),
        eval=dataset(eval_items),
        collate=align.collate_transcripts,
    )


def _report_transcripts(config: TrainConfig, model: OmniModel, trainer: Trainer,
                        stage: StageData) -> None:
    """Align stage: held-out greedy transcripts through the CTC head, logged and written."""
    if stage.eval is None or not len(stage.eval):
        return
    module = trainer.accelerator.unwrap_model(trainer.module)
    report = align.heldout_transcripts(module, stage.eval, model.llm.tokenizer,
                                       config.micro_batch_size)
    trainer.log_event({"event": "heldout_transcripts", "step": trainer.progress.step,
                        "items": report["items"], "wer": report["wer"]})
    path = Path(config.output_dir) / "heldout-transcripts.json"
    path.write_text(json.dumps(report, indent=2) + "\n")


def _stage2(
    model: OmniModel,
    config: TrainConfig,
    features: TensorCache,
    train_ex: list[SpeechTextExample],
    eval_ex: list[SpeechTextExample],
    items: list[Conversation],
    processes: PartialState,
) -> StageData:
    dtype = TORCH_DTYPES[config.data.cache_dtype]
    states = TensorCache(config.data.cache_dir, states_namespace(model, features.root.name, dtype))
    cache_answer_states(
        model, train_ex + eval_ex, features, states, batch_size=config.data.encode_batch_size,
        dtype=dtype, shard=(processes.process_index, processes.num_processes),
        progress=processes.is_main_process,
    )
    processes.wait_for_everyone()
    by_id = {c.id: c for c in items}
    vocab = model.config.speech_decoder.unit_vocab
    train_units = unit_examples(train_ex, by_id, vocab)
    if not train_units:
        raise DataError(f"{config.data.train}: no answer has 'units'; stage 2 trains on units")
    return StageData(
        module=Stage2Module(model.speech_decoder),
        train=UnitDataset(train_units, states),
        eval=UnitDataset(unit_examples(eval_ex, by_id, vocab), states),
        collate=collate_units,
    )

