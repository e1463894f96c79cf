"""Stage 1, speech -> text: adaptor + LLM with next-token cross-entropy on the answer tokens.

The encoder is frozen, so its features come from the cache; the module trained here
holds only the adaptor and the LLM (whose parameters are full, LoRA, or frozen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_omni.model.adaptor import SpeechAdaptor
from llama_omni.model.llm import LLMOutput, SpeechLLM
from llama_omni.model.prompt import IGNORE_INDEX
from llama_omni.train.batches import SpeechTextBatch
from llama_omni.train.data import answer_spans


def teacher_forced(adaptor: SpeechAdaptor, llm: SpeechLLM, batch: SpeechTextBatch) -> LLMOutput:
    """One pass over whole conversations (speech spliced in), right-padded like the labels."""
    frames = adaptor(batch.features.to(adaptor.linear1.weight.dtype))  # [S, N/k, D]
    counts = adaptor.output_lengths(batch.feature_lengths).tolist()
    segments = [frames[s, :n] for s, n in enumerate(counts)]  # [n_s, D] each
    embeds, mask, positions = llm.embed_prompt(batch.ids, segments, padding_side="right")
    if embeds.shape[1] != batch.labels.shape[1]:
        raise ValueError(
            f"labels cover {batch.labels.shape[1]} positions but the embedded batch has "
            f"{embeds.shape[1]}: the collator's downsample factor must be the adaptor's"
        )
    return llm(embeds, mask, positions)  # logits [B, L, V], hidden [B, L, D]


class Stage1Module(nn.Module):
    """forward(batch) -> (summed cross-entropy, number of supervised tokens)."""

    def __init__(self, adaptor: SpeechAdaptor, llm: SpeechLLM):
        super().__init__()
        self.adaptor = adaptor
        self.llm = llm

    def forward(self, batch: SpeechTextBatch) -> tuple[Tensor, Tensor]:
        out = teacher_forced(self.adaptor, self.llm, batch)
        targets = batch.labels[:, 1:]  # [B, L-1]: position t predicts token t+1
        supervised = targets != IGNORE_INDEX
        logits = out.logits[:, :-1][supervised].float()  # [T, V]
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        return loss, supervised.sum()


@torch.no_grad()
def answer_states(adaptor: SpeechAdaptor, llm: SpeechLLM, batch: SpeechTextBatch) -> list[list[Tensor]]:
    """c_1..c_M of every answer of every item: the states that predicted its tokens.

    Returns, per item, one [M_j, D] tensor per answer (in conversation order).
    """
    hidden = teacher_forced(adaptor, llm, batch).hidden  # [B, L, D]
    out = []
    for b, row in enumerate(batch.labels.tolist()):
        out.append([hidden[b, start - 1 : end - 1] for start, end in answer_spans(row)])
    return out
