"""Checkpoints: our own format, and import of the published LLaMA-Omni format.

Our format is one directory:
    llama_omni.json     {"format_version": 1, "config": OmniConfig}
    model.safetensors   adaptor.*, speech_decoder.* (and encoder.* when embedded)
    llm/                a Hugging Face model + tokenizer directory, when the LLM is embedded
The published format (Llama-3.1-8B-Omni) is a Hugging Face directory whose config.json
has model_type "omni_speech2s_llama"; it loads with the published behaviour (its prompt
ids, 30 s padding, its stop ids), see SPEC section 7.

Loading is strict everywhere: a missing, unexpected or mis-shaped tensor is an error
that names it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llama_omni.errors import CheckpointError
from llama_omni.model.adaptor import AdaptorConfig, SpeechAdaptor
from llama_omni.model.encoder import EncoderConfig, WhisperEncoder
from llama_omni.model.encoder_loaders import load_encoder, load_openai_whisper_checkpoint
from llama_omni.model.llm import EMBEDDED_SUBDIR, LLMConfig, SpeechLLM, load_backbone
from llama_omni.model.lora import LORA_SUBDIR, fold_lora
from llama_omni.model.omni import OmniConfig, OmniModel
from llama_omni.model.speech_decoder import SpeechDecoder, SpeechDecoderConfig

CONFIG_FILE = "llama_omni.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
PUBLISHED_MODEL_TYPE = "omni_speech2s_llama"
PUBLISHED_PAD_ID = 128004  # what the original inference passes; the config has none


# -- strict state-dict loading -------------------------------------------------------------
def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy `tensors` into `module`, refusing any missing, unexpected or mis-shaped name."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors {misshaped}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    module.load_state_dict(tensors, strict=True)


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# -- our format ----------------------------------------------------------------------------
def save_checkpoint(model: OmniModel, directory: str | Path) -> Path:
    """Write `model` in our format; the directory appears complete or not at all."""
    directory = Path(directory)
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    parts: list[tuple[str, nn.Module]] = [("adaptor", model.adaptor), ("speech_decoder", model.speech_decoder)]
    if cfg.encoder_source == "embedded":
        parts.append(("encoder", model.encoder))
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = tensor.detach().contiguous().cpu()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if cfg.llm.source == "embedded":
            model.llm.model.save_pretrained(tmp / EMBEDDED_SUBDIR)
            model.llm.tokenizer.save_pretrained(tmp / EMBEDDED_SUBDIR)
        adapter = model.llm.folded_adapter
        if adapter is not None and cfg.llm.source != "embedded":  # embedded: saved folded
            if not adapter.is_dir():
                raise CheckpointError(
                    f"the LLM holds the LoRA update of {adapter}, which is gone, and the "
                    "checkpoint names its backbone by reference: restore that directory, or "
                    "save with the LLM embedded"
                )
            shutil.copytree(adapter, tmp / LORA_SUBDIR)
        payload = {"format_version": FORMAT_VERSION, "config": cfg.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_config(directory: str | Path) -> OmniConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not a llama-omni checkpoint directory") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported by this llama-omni "
            f"(expected {FORMAT_VERSION}); upgrade llama-omni"
        )
    try:
        return OmniConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid config: {err}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises several error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def _check_encoder_dims(loaded: EncoderConfig, expected: EncoderConfig, source: str) -> None:
    fields = ("n_mels", "n_ctx", "width", "n_heads", "n_layers")
    diffs = [
        f"{f}: {getattr(loaded, f)} vs {getattr(expected, f)}"
        for f in fields
        if getattr(loaded, f) != getattr(expected, f)
    ]
    if diffs:
        raise CheckpointError(f"encoder {source!r} does not match the checkpoint config ({'; '.join(diffs)})")


def load_own_checkpoint(directory: str | Path, *, device=None, dtype=None) -> OmniModel:
    directory = Path(directory)
    cfg = read_config(directory)
    tensors = _load_weights(directory / WEIGHTS_FILE)
    known = ("adaptor.", "speech_decoder.", "encoder.")
    stray = sorted(k for k in tensors if not k.startswith(known))
    if stray:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unexpected tensors {stray}")
    if cfg.encoder_source == "embedded":
        encoder = WhisperEncoder(cfg.encoder)
        load_strict(encoder, _with_prefix(tensors, "encoder."), "encoder")
    else:
        if any(k.startswith("encoder.") for k in tensors):
            raise CheckpointError(
                f"{directory}: encoder tensors are stored but encoder_source is {cfg.encoder_source!r}"
            )
        loaded_cfg, encoder = load_encoder(cfg.encoder_source, pad_to_30s=cfg.encoder.pad_to_30s)
        _check_encoder_dims(loaded_cfg, cfg.encoder, cfg.encoder_source)
    backbone, tokenizer = load_backbone(cfg.llm.source, base_dir=directory)
    llm = SpeechLLM(backbone, tokenizer, cfg.llm)
    if (directory / LORA_SUBDIR).is_dir():  # a backbone by reference + our LoRA update
        fold_lora(backbone, directory / LORA_SUBDIR)
        llm.folded_adapter = (directory / LORA_SUBDIR).resolve()
    adaptor, decoder = SpeechAdaptor(cfg.adaptor), SpeechDecoder(cfg.speech_decoder)
    load_strict(adaptor, _with_prefix(tensors, "adaptor."), "adaptor")
    load_strict(decoder, _with_prefix(tensors, "speech_decoder."), "speech decoder")
    model = OmniModel(cfg, encoder, llm, adaptor, decoder)
    return model.to(device=device, dtype=dtype).eval()


# -- the published format ------------------------------------------------------------------
def is_published_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == PUBLISHED_MODEL_TYPE
    except json.JSONDecodeError:
        return False


class _ShardReader:
    """Name -> tensor access across the safetensors shards of a Hugging Face directory."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / shard for name, shard in weight_map.items()}
        else:
            self.files = {}
            for shard in sorted(directory.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    self.files.update({name: shard for name in f.keys()})
        if not self.files:
            raise CheckpointError(f"{directory}: no safetensors shards found")
        for shard in set(self.files.values()):
            if not shard.is_file():
                raise CheckpointError(f"{directory}: shard {shard.name} named by the index is missing")

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in self.names(prefix):
            by_file.setdefault(self.files[name], []).append(name)
        for shard, names in by_file.items():
            with safe_open(shard, "pt") as f:
                for name in names:
                    out[name[len(prefix):]] = f.get_tensor(name)
        return out


def _published_stop_ids(directory: Path, config: dict) -> tuple[int, ...]:
    eos = None
    generation = directory / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
    if eos is None:
        eos = config.get("eos_token_id")
    if eos is None:
        raise CheckpointError(f"{directory}: no eos_token_id in generation_config.json or config.json")
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _published_encoder(
    directory: Path, config: dict, shards: _ShardReader, speech_encoder: str | Path | None
) -> tuple[EncoderConfig, WhisperEncoder]:
    """The Whisper encoder: the openai-whisper .pt named by config.json and/or the shards."""
    named = speech_encoder if speech_encoder is not None else config.get("speech_encoder")
    path = Path(named) if named else None
    if path is not None and not path.is_absolute():
        path = directory / path
    in_shards = shards.read("model.speech_encoder.")
    if path is not None and path.is_file():
        enc_cfg, encoder = load_openai_whisper_checkpoint(path)
    elif in_shards:
        enc_cfg = _encoder_config_from_tensors(in_shards)
        encoder = WhisperEncoder(enc_cfg)
    else:
        raise CheckpointError(
            f"speech encoder not found: {path} does not exist and the shards hold no "
            "model.speech_encoder.* tensors; pass the whisper large-v3.pt path explicitly"
        )
    if in_shards:
        load_strict(encoder, in_shards, "speech encoder (model.speech_encoder.* in the shards)")
    return enc_cfg.replace(pad_to_30s=True), encoder


def _encoder_config_from_tensors(tensors: dict[str, torch.Tensor]) -> EncoderConfig:
    width, n_mels, _ = tensors["conv1.weight"].shape
    n_ctx = tensors["positional_embedding"].shape[0]
    n_layers = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    # Every Whisper size uses 64-wide attention heads.
    return EncoderConfig(
        n_mels=n_mels, n_ctx=n_ctx, width=width, n_heads=width // 64, n_layers=n_layers,
        pad_to_30s=True,
    )


def load_published_checkpoint(
    directory: str | Path, *, speech_encoder: str | Path | None = None, device=None, dtype=None
) -> OmniModel:
    """Import a published-format checkpoint (Llama-3.1-8B-Omni layout) with its behaviour."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    for key, supported in [("speech_encoder_type", "whisper"), ("speech_projector_type", "linear"),
                           ("speech_generator_type", "ctc")]:
        if config.get(key, supported) != supported:
            raise CheckpointError(f"{directory}: {key} {config[key]!r} is not supported (only {supported!r})")
    shards = _ShardReader(directory)
    enc_cfg, encoder = _published_encoder(directory, config, shards, speech_encoder)

    omni_fields = {"speech_encoder", "speech_encoder_type", "speech_projector_type",
                   "speech_encoder_ds_rate", "speech_encoder_hidden_size", "speech_generator_type",
                   "ctc_decoder_config", "ctc_upsample_factor", "ctc_loss_weight", "unit_vocab_size",
                   "speech_normalize", "model_type", "architectures", "tune_speech_generator_only",
                   "tokenizer_model_max_length", "tokenizer_padding_side"}
    llama_config = LlamaConfig(**{k: v for k, v in config.items() if k not in omni_fields})
    # The shards also hold the speech tensors, which transformers reports as unexpected:
    # they are checked here instead, so its loading report is silenced.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone, info = LlamaForCausalLM.from_pretrained(
            directory, config=llama_config, dtype=dtype or torch.float32, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    speech_prefixes = ("model.speech_encoder.", "model.speech_projector.", "speech_generator.")
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(speech_prefixes)]
    mismatched = info.get("mismatched_keys") or []
    if info["missing_keys"] or unexpected or mismatched:
        raise CheckpointError(
            f"{directory}: LLM weights do not match config.json (missing {sorted(info['missing_keys'])}, "
            f"unexpected {sorted(unexpected)}, mis-shaped {mismatched})"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, config=llama_config)
    llm_cfg = LLMConfig(
        source=str(directory), hidden_size=llama_config.hidden_size, prompt_style="llama3-omni",
        stop_token_ids=_published_stop_ids(directory, config),
        pad_token_id=config.get("pad_token_id") or PUBLISHED_PAD_ID,
    )
    projector = shards.read("model.speech_projector.")
    if "linear1.weight" not in projector:
        raise CheckpointError(f"{directory}: model.speech_projector.linear1.weight is missing")
    adaptor_cfg = AdaptorConfig(
        encoder_width=int(config.get("speech_encoder_hidden_size", enc_cfg.width)),
        llm_width=llama_config.hidden_size,
        downsample=int(config.get("speech_encoder_ds_rate", 5)),
        hidden=int(projector["linear1.weight"].shape[0]),
    )
    omni_cfg = OmniConfig(
        encoder=enc_cfg, adaptor=adaptor_cfg, llm=llm_cfg,
        speech_decoder=SpeechDecoderConfig.from_published(config),
    )
    adaptor, decoder = SpeechAdaptor(adaptor_cfg), SpeechDecoder(omni_cfg.speech_decoder)
    load_strict(adaptor, projector, "speech adaptor (model.speech_projector.*)")
    load_strict(decoder, shards.read("speech_generator."), "speech decoder (speech_generator.*)")
    llm = SpeechLLM(backbone, tokenizer, llm_cfg)
    model = OmniModel(omni_cfg, encoder, llm, adaptor, decoder)
    return model.to(device=device, dtype=dtype).eval()


def load_model(
    path: str | Path, *, speech_encoder: str | Path | None = None, device=None, dtype=None
) -> OmniModel:
    """Load any supported checkpoint directory: ours or the published format."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a directory")
    if (path / CONFIG_FILE).is_file():
        return load_own_checkpoint(path, device=device, dtype=dtype)
    if is_published_checkpoint(path):
        return load_published_checkpoint(path, speech_encoder=speech_encoder, device=device, dtype=dtype)
    raise CheckpointError(
        f"{path} is neither a llama-omni checkpoint ({CONFIG_FILE}) nor a published LLaMA-Omni "
        f"checkpoint (config.json with model_type {PUBLISHED_MODEL_TYPE!r})"
    )

