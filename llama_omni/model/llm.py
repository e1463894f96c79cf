"""LLM stage M: any Hugging Face causal LM with speech embeddings spliced into its prompt.

`SpeechLLM` turns prompt ids (with SPEECH_TOKEN_INDEX slots, see prompt.py) and speech
segments from the adaptor into a padded batch of input embeddings, and runs the backbone
on them, returning the logits and the final hidden states the speech decoder reads.
Decoding loops live elsewhere; one forward call with a KV cache is one decoding step.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_omni.configbase import ConfigBase, require
from llama_omni.model.prompt import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_PROMPT,
    PROMPT_STYLES,
    SPEECH_PLACEHOLDER,
    SPEECH_TOKEN_INDEX,
    Turn,
    build_prompt_ids,
)
from llama_omni.packaged import smollm2_dir

PACKAGED_LLMS: dict[str, Callable[[], Path]] = {"packaged:smollm2-135m-instruct": smollm2_dir}
EMBEDDED_SOURCE = "embedded"
EMBEDDED_SUBDIR = "llm"  # where a llama-omni checkpoint directory keeps its backbone


@dataclass
class LLMConfig(ConfigBase):
    """The backbone and how prompts are written for it.

    source: a Hugging Face model directory (relative paths resolve against the checkpoint
    directory when there is one), a packaged model ("packaged:smollm2-135m-instruct"), or
    "embedded" (the `llm/` folder of the checkpoint directory).
    stop_token_ids: empty means the backbone's eos ids (generation_config + config).
    repetition_penalty: the decoding this checkpoint is meant to be run with (1 = the
    paper's plain greedy); chat, the server, the web demo and the harness use it unless a
    request sets its own. A small backbone tuned briefly may loop on a phrase without it.
    The prompt defaults are the published LLaMA-Omni checkpoint's.
    """

    source: str
    hidden_size: int
    prompt_style: str = "llama3-omni"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    instruction: str = DEFAULT_INSTRUCTION
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(self.stop_token_ids)
        require(isinstance(self.source, str) and bool(self.source), "LLMConfig.source is empty")
        require(
            not self.source.startswith("packaged:") or self.source in PACKAGED_LLMS,
            f"LLMConfig.source {self.source!r}: unknown packaged LLM; "
            f"known: {sorted(PACKAGED_LLMS)}",
        )
        require(
            _is_int(self.hidden_size) and self.hidden_size > 0,
            f"LLMConfig.hidden_size must be a positive int, got {self.hidden_size!r}",
        )
        require(
            self.prompt_style in PROMPT_STYLES,
            f"LLMConfig.prompt_style {self.prompt_style!r}: choose one of {PROMPT_STYLES}",
        )
        for name in ("system_prompt", "instruction"):
            value = getattr(self, name)
            require(isinstance(value, str), f"LLMConfig.{name} must be a string")
            require(
                SPEECH_PLACEHOLDER not in value,
                f"LLMConfig.{name} must not contain {SPEECH_PLACEHOLDER!r}",
            )
        require(
            all(_is_int(i) and i >= 0 for i in self.stop_token_ids),
            f"LLMConfig.stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids}",
        )
        require(
            self.pad_token_id is None or (_is_int(self.pad_token_id) and self.pad_token_id >= 0),
            f"LLMConfig.pad_token_id must be None or a token id, got {self.pad_token_id!r}",
        )
        require(
            isinstance(self.repetition_penalty, (int, float))
            and not isinstance(self.repetition_penalty, bool)
            and math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 1,
            f"LLMConfig.repetition_penalty must be >= 1 (1 = off), got {self.repetition_penalty!r}",
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LLMOutput(NamedTuple):
    logits: Tensor  # [B, L, V]
    hidden: Tensor  # [B, L, D] final-layer state after the final norm (the LM head's input)
    past_key_values: Any  # transformers Cache when use_cache, else None


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which a transformers model takes its KV cache: transformers 5
    renamed `past_key_values` to `cache` (the old name warns and is to be removed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return _cache_keyword_of(type(base))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:  # once per class: called every decoding step
    takes_cache = "cache" in inspect.signature(model_class.forward).parameters
    return "cache" if takes_cache else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache in a transformers model output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def resolve_source(source: str, base_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory an LLMConfig.source names (see LLMConfig)."""
    if source in PACKAGED_LLMS:
        return PACKAGED_LLMS[source]()
    if source == EMBEDDED_SOURCE:
        require(base_dir is not None, "LLM source 'embedded' needs base_dir (the checkpoint dir)")
        path = Path(base_dir) / EMBEDDED_SUBDIR
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"LLM source {source!r}: {path} is not a Hugging Face model directory (no "
            "config.json there). Give the directory holding config.json, tokenizer files and "
            f"weights, or one of {sorted(PACKAGED_LLMS)}."
        )
    return path


def load_backbone(
    source: str,
    *,
    base_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) from a source; dtype None keeps the stored weights' dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source, base_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype is not None else "auto")
    if device is not None:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


class SpeechLLM(nn.Module):
    """A causal LM whose prompts hold speech segments at SPEECH_TOKEN_INDEX positions."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: LLMConfig):
        super().__init__()
        width = model.config.get_text_config().hidden_size
        require(
            width == config.hidden_size,
            f"LLMConfig.hidden_size is {config.hidden_size} but the backbone is {width} wide; "
            "set hidden_size to the backbone's width (the adaptor output size follows it)",
        )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # The `lora/` folded into the weights at load: a checkpoint that names its backbone
        # by reference must store it again (save_checkpoint does), or the update is lost.
        self.folded_adapter: Path | None = None
        self._stop_token_ids = frozenset(config.stop_token_ids) or _backbone_eos_ids(
            model, tokenizer
        )

    @classmethod
    def load(
        cls,
        config: LLMConfig,
        *,
        base_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> SpeechLLM:
        model, tokenizer = load_backbone(
            config.source, base_dir=base_dir, dtype=dtype, device=device
        )
        return cls(model, tokenizer, config)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_token_ids

    @property
    def pad_token_id(self) -> int | None:
        """Config value, else the tokenizer's; None means the caller picks (e.g. a stop id)."""
        if self.config.pad_token_id is not None:
            return self.config.pad_token_id
        return self.tokenizer.pad_token_id

    def prompt_ids(self, turns: list[Turn] | None = None) -> list[int]:
        """Inference prompt in the configured style; default: one user turn with speech."""
        return build_prompt_ids(
            self.tokenizer,
            turns if turns is not None else [Turn.user()],
            style=self.config.prompt_style,
            system_prompt=self.config.system_prompt,
            instruction=self.config.instruction,
        )

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """[...] token ids -> [..., D] input embeddings."""
        return self.model.get_input_embeddings()(ids)

    def embed_prompt(
        self,
        prompt_ids: list[list[int]],
        speech: list[Tensor],
        padding_side: str = "left",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Splice speech into a batch of prompts and pad them to one length.

        speech holds one [N_i, D] segment per placeholder, in batch order: the first
        prompt's placeholders take the first segments, and so on. Padding positions get
        zero embeddings, attention 0 and position 0; real positions count 0, 1, 2, ...
        Returns inputs_embeds [B, L, D], attention_mask [B, L], position_ids [B, L].
        """
        require(padding_side in ("left", "right"), f"padding_side {padding_side!r}: left|right")
        require(len(prompt_ids) > 0 and all(prompt_ids), "embed_prompt needs non-empty prompts")
        slots = [ids.count(SPEECH_TOKEN_INDEX) for ids in prompt_ids]
        require(
            sum(slots) == len(speech),
            f"the prompts hold {sum(slots)} speech placeholders ({slots} per prompt) but "
            f"{len(speech)} speech segments were given",
        )
        segments = iter(speech)
        items = [
            self._splice(ids, [next(segments) for _ in range(k)])
            for ids, k in zip(prompt_ids, slots)
        ]
        return _pad(items, padding_side)

    def _splice(self, ids: list[int], segments: list[Tensor]) -> Tensor:
        """One prompt -> [L, D] embeddings, each placeholder replaced by its segment."""
        table = self.model.get_input_embeddings()
        ids_t = torch.tensor(ids, dtype=torch.long, device=table.weight.device)  # [T]
        is_speech = ids_t == SPEECH_TOKEN_INDEX
        bad = ~is_speech & ((ids_t < 0) | (ids_t >= table.num_embeddings))
        require(not bad.any(), f"prompt ids outside the vocabulary: {ids_t[bad].tolist()}")
        text = table(ids_t.masked_fill(is_speech, 0))  # [T, D]; placeholder rows are dropped
        pieces, start = [], 0
        for pos, segment in zip(is_speech.nonzero().flatten().tolist(), segments):
            require(
                segment.dim() == 2 and segment.shape[1] == self.hidden_size,
                f"speech segments must be [N, {self.hidden_size}], got {tuple(segment.shape)}",
            )
            pieces += [text[start:pos], segment.to(text)]
            start = pos + 1
        pieces.append(text[start:])
        return torch.cat(pieces)  # [L, D]

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> LLMOutput:
        """Run the backbone on embeddings.

        For a cached step, inputs_embeds / position_ids cover only the new positions
        [B, L_new, ...] while attention_mask covers past and new ones [B, L_past + L_new].
        """
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
            **{cache_keyword(self.model): past_key_values},
        )
        # transformers >= 5 reports the last hidden state after the final norm (tested).
        cache = output_cache(out) if use_cache else None
        return LLMOutput(out.logits, out.hidden_states[-1], cache)


def _pad(items: list[Tensor], padding_side: str) -> tuple[Tensor, Tensor, Tensor]:
    """[L_i, D] items -> embeds [B, L, D], attention mask [B, L], position ids [B, L]."""
    length = max(x.shape[0] for x in items)
    embeds, masks = [], []
    for x in items:
        gap = length - x.shape[0]
        before, after = (gap, 0) if padding_side == "left" else (0, gap)
        embeds.append(F.pad(x, (0, 0, before, after)))  # [L, D]
        mask = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        masks.append(F.pad(mask, (before, after)))  # [L]
    mask = torch.stack(masks)  # [B, L]
    positions = (mask.cumsum(-1) - 1) * mask  # [B, L]
    return torch.stack(embeds), mask, positions


def _backbone_eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """eos ids of generation_config and config (Llama-3.1: 128001, 128008, 128009)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    require(bool(ids), "the backbone declares no eos token id; set LLMConfig.stop_token_ids")
    return frozenset(ids)
