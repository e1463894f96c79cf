"""Stage 1, speech -> text: adaptor + LLM with next-token cross-entropy on the answer tokens.

The encoder is frozen, so its features come from the cache; the module trained here
holds only the adaptor and the LLM (whose parameters are full, LoRA, or frozen).

Optional distillation (`distill` > 0, our addition to the paper): the backbone itself,
reading the transcript as a written question (without any LoRA: peft's adapters are
switched off, and for a checkpoint whose LoRA was folded into the weights when it loaded, a
second, untouched copy of the backbone is the teacher), gives a next-token
distribution at every answer token, and KL(written || spoken) is added to the loss. The
cross-entropy sees one token per position; the teacher's whole distribution says what
the backbone would have answered had it read the question, which is what a spoken
question should make it do. Evaluation losses stay the cross-entropy alone.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_omni.model.adaptor import SpeechAdaptor
from llama_omni.model.llm import LLMOutput, SpeechLLM, load_backbone
from llama_omni.model.omni import decoder_inputs
from llama_omni.model.prompt import IGNORE_INDEX
from llama_omni.model.speech_decoder import SpeechDecoderConfig
from llama_omni.train.batches import SpeechTextBatch
from llama_omni.train.data import answer_spans


TEACHER = "teacher"  # Stage1Module.teacher, the distillation teacher: not part of the model


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


@torch.no_grad()
def written_logits(llm: SpeechLLM, batch: SpeechTextBatch) -> Tensor:
    """[T, V] the backbone's logits at the T answer tokens of the written conversations,
    with LoRA adapters (if any) switched off; in the order of the spoken batch's. For a
    model loaded with its LoRA folded in, pass `untouched_backbone(llm)` as `llm`."""
    if batch.written_ids is None or batch.written_labels is None:
        raise ValueError("this batch has no written conversations: build the examples "
                         "with_written=True (the config's distill > 0)")
    # a peft model runs its base weights inside disable_adapter(); a plain one is the base
    backbone = getattr(llm.model, "disable_adapter", contextlib.nullcontext)
    with backbone():
        embeds, mask, positions = llm.embed_prompt(batch.written_ids, [], padding_side="right")
        logits = llm(embeds, mask, positions).logits  # [B, Lw, V]
    return answer_logits(logits, batch.written_labels)


def untouched_backbone(llm: SpeechLLM) -> SpeechLLM | None:
    """A frozen copy of the backbone as released, for a model whose LoRA update was folded
    into its weights when the checkpoint loaded (disabling adapters cannot undo that);
    None when `llm` has no folded update."""
    if llm.folded_adapter is None:
        return None
    weight = next(llm.parameters())
    model, _ = load_backbone(llm.config.source, base_dir=llm.folded_adapter.parent,
                             dtype=weight.dtype, device=weight.device)
    return SpeechLLM(model, llm.tokenizer, llm.config).requires_grad_(False).eval()


def answer_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """[T, V] float32 logits of the positions that predict the T supervised tokens of
    [B, L] labels (position t predicts token t+1), from [B, L, V]."""
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float()


class Stage1Module(nn.Module):
    """forward(batch) -> (summed loss, number of supervised tokens).

    The loss is the cross-entropy, plus `distill` x the summed KL from the written
    question's answer distributions in training mode. The teacher is `llm` without its
    adapters, or `teacher` (a frozen, untouched backbone) when `llm` has a folded LoRA.
    """

    def __init__(self, adaptor: SpeechAdaptor, llm: SpeechLLM, distill: float = 0.0):
        super().__init__()
        self.adaptor = adaptor
        self.llm = llm
        self.distill = distill
        self.teacher = untouched_backbone(llm) if distill else None  # named TEACHER

    def train(self, mode: bool = True) -> Stage1Module:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a fixed reference: no dropout in it
        return self

    def forward(self, batch: SpeechTextBatch) -> tuple[Tensor, Tensor]:
        out = teacher_forced(self.adaptor, self.llm, batch)
        targets = batch.labels[:, 1:]  # [B, L-1]: position t predicts token t+1
        supervised = targets != IGNORE_INDEX
        logits = answer_logits(out.logits, batch.labels)  # [T, V]
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        if self.distill and self.training:
            teacher = written_logits(self.llm if self.teacher is None else self.teacher, batch)
            loss = loss + self.distill * divergence(logits, teacher)
        return loss, supervised.sum()


def divergence(student: Tensor, teacher: Tensor) -> Tensor:
    """Summed KL(teacher || student) over T positions of [T, V] logits."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} but teacher logits "
                         f"{tuple(teacher.shape)}: the answers must be the same tokens")
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                    reduction="sum")


@torch.no_grad()
def answer_states(
    adaptor: SpeechAdaptor, llm: SpeechLLM, batch: SpeechTextBatch, decoder: SpeechDecoderConfig
) -> list[list[Tensor]]:
    """The speech decoder's inputs for every answer of every item: c_1..c_M, the states
    that predicted its tokens (with the tokens' embeddings if `decoder.token_input`).

    Returns, per item, one [M_j, Din] tensor per answer (in conversation order).
    """
    hidden = teacher_forced(adaptor, llm, batch).hidden  # [B, L, D]
    out = []
    for b, row in enumerate(batch.labels.tolist()):
        out.append([
            decoder_inputs(llm, decoder, hidden[b, start - 1 : end - 1], batch.labels[b, start:end])
            for start, end in answer_spans(row)
        ])
    return out
