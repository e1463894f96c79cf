"""Stage 2, text states -> units: only the speech decoder, with CTC.

The LLM is frozen, so the decoder's inputs c_i (teacher-forced states that predicted
each answer token) are computed once per answer and cached; training then runs the
small decoder alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llama_omni.model.omni import OmniModel
from llama_omni.model.prompt import IGNORE_INDEX
from llama_omni.model.speech_decoder import SpeechDecoder
from llama_omni.train.batches import (
    SpeechTextCollator,
    SpeechTextDataset,
    SpeechTextExample,
    UnitBatch,
    UnitExample,
)
from llama_omni.train.data import Conversation, DataError, answer_spans
from llama_omni.train.features import TensorCache, tensors_digest, text_digest
from llama_omni.train.stage1 import answer_states


class Stage2Module(nn.Module):
    """forward(batch) -> (summed CTC loss, number of target units)."""

    def __init__(self, speech_decoder: SpeechDecoder):
        super().__init__()
        self.speech_decoder = speech_decoder

    def forward(self, batch: UnitBatch) -> tuple[Tensor, Tensor]:
        dtype = self.speech_decoder.input_proj.weight.dtype
        count = batch.units.ne(IGNORE_INDEX).sum(-1)  # [B]
        log_probs, lengths = self.speech_decoder(batch.hidden.to(dtype), batch.lengths, count)
        loss = self.speech_decoder.ctc_loss(log_probs, lengths, batch.units)  # per unit
        return loss * count.sum(), count.sum()


def states_namespace(model: OmniModel, feature_namespace: str, dtype: torch.dtype) -> str:
    """Identity of what produced the states: features, adaptor and LLM weights, dtype, and
    whether the token embeddings are appended."""
    weights = tensors_digest(
        sorted([*model.adaptor.state_dict().items(), *model.llm.state_dict().items()])
    )
    parts = [feature_namespace, weights, str(dtype)]
    if model.config.speech_decoder.token_input:
        parts.append("token_input")
    return "states-" + text_digest(*parts)


def unit_examples(
    examples: list[SpeechTextExample],
    conversations: dict[str, Conversation],
    unit_vocab: int,
) -> list[UnitExample]:
    """One stage-2 example per answer that has units; answers without units are skipped."""
    out = []
    for example in examples:
        keys = _state_keys(example)
        for j, units in enumerate(conversations[example.id].answer_units):
            if not units:
                continue
            if max(units) >= unit_vocab or min(units) < 0:
                raise DataError(
                    f"item {example.id!r}: unit ids span {min(units)}..{max(units)} but the "
                    f"speech decoder has {unit_vocab} units; set "
                    "model.overrides.speech_decoder.unit_vocab to the unit vocabulary size"
                )
            out.append(UnitExample(f"{example.id}/{j}", keys[j], list(units)))
    return out


@torch.no_grad()
def cache_answer_states(
    model: OmniModel,
    examples: list[SpeechTextExample],
    features: TensorCache,
    states: TensorCache,
    *,
    batch_size: int,
    dtype: torch.dtype,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> None:
    """Compute and store the states of every answer whose states are not cached yet."""
    rank, world = shard
    ordered = sorted(examples, key=lambda e: (e.length, e.id))  # the same split in every process
    todo = [e for e in ordered[rank::world] if not all(states.has(k) for k in _state_keys(e))]
    collate = SpeechTextCollator(model.adaptor.config.downsample)
    data = SpeechTextDataset(todo, features)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(todo), desc="caching LLM states", unit="item", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = list(range(start, min(start + batch_size, len(todo))))
        batch = collate([data[i] for i in chunk]).to(model.device)
        inputs = answer_states(model.adaptor, model.llm, batch, model.config.speech_decoder)
        for i, per_answer in zip(chunk, inputs):
            for key, c in zip(_state_keys(todo[i]), per_answer):
                states.save(key, {"states": c.to(dtype)})  # [M_j, Din]
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)


def _state_keys(example: SpeechTextExample) -> list[str]:
    """Cache keys of an item's answers: its audio content, its token ids, the answer index."""
    item_key = text_digest(*example.feature_keys, ",".join(map(str, example.ids)))
    return [f"{item_key}-{j}" for j in range(len(answer_spans(example.labels)))]
