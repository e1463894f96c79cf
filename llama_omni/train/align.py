"""Adaptor pre-alignment, the optional "align" stage before stage 1 (our addition to the paper).

Stage 1 on a few hundred spoken questions can end with answers that ignore the question:
the LLM learns the answers' style faster than the adaptor learns to carry the words. This
stage trains the adaptor alone to carry them. Its output at each 10 Hz position is scored
against the LLM's own (frozen) input embedding table, logits = s * a_t . E^T plus one
learned blank, and CTC ties the positions to the transcript's tokens. There is no LLM
pass, so a step costs a fraction of a stage-1 step. The run exports a normal checkpoint
(the CTC head is dropped) that starts stage 1: `model.checkpoint=<align run>/final`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from llama_omni.model.adaptor import SpeechAdaptor
from llama_omni.model.omni import OmniModel
from llama_omni.train.batches import Movable
from llama_omni.train.data import Conversation, DataError
from llama_omni.train.features import TensorCache

HEAD = "head"  # the stage module's attribute for the CTC head; not part of the model


@dataclass
class TranscriptExample:
    id: str  # "<item id>/<speech index>"
    feature_key: str  # encoder-feature cache key
    tokens: list[int]  # the transcript's LLM tokens


@dataclass
class TranscriptBatch(Movable):
    features: Tensor  # [S, N, De] encoder frames, zero-padded
    feature_lengths: Tensor  # [S]
    targets: Tensor  # [S, U] transcript tokens, zero-padded
    target_lengths: Tensor  # [S]
    positions: int  # transcript tokens, for tokens per second


def transcript_examples(
    conversations: list[Conversation],
    tokenizer: Any,
    feature_keys: dict[Path, str],
    features: TensorCache,
    downsample: int,
) -> tuple[list[TranscriptExample], list[str]]:
    """One example per spoken user turn; returns (kept, ids too short for their tokens).

    CTC needs at least one adaptor position per token, so a turn with more tokens than
    positions cannot be aligned and is skipped.
    """
    kept, too_short = [], []
    for conversation in conversations:
        spoken = [t for t in conversation.turns if t.role == "user" and t.audio is not None]
        for n, turn in enumerate(spoken):
            if not turn.transcript:
                raise DataError(
                    f"item {conversation.id!r}: spoken user turn {n} has no transcript (the "
                    "manifest's user 'text'); the align stage trains on transcripts"
                )
            key = feature_keys[turn.audio]
            tokens = tokenizer.encode(turn.transcript.strip(), add_special_tokens=False)
            example_id = f"{conversation.id}/{n}"
            if features.shape(key, "features")[0] // downsample < len(tokens):
                too_short.append(example_id)
                continue
            kept.append(TranscriptExample(example_id, key, tokens))
    return kept, too_short


class TranscriptDataset(Dataset):
    def __init__(self, examples: list[TranscriptExample], features: TensorCache):
        self.examples = examples
        self.features = features

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.tokens) for e in self.examples]  # the speech length follows the transcript

    def __getitem__(self, index: int) -> tuple[Tensor, list[int]]:
        example = self.examples[index]
        return self.features.load(example.feature_key)["features"], example.tokens


def collate_transcripts(items: list[tuple[Tensor, list[int]]]) -> TranscriptBatch:
    target_lengths = torch.tensor([len(t) for _, t in items])
    return TranscriptBatch(
        features=pad_sequence([f for f, _ in items], batch_first=True).float(),  # [S, N, De]
        feature_lengths=torch.tensor([f.shape[0] for f, _ in items]),
        targets=pad_sequence([torch.tensor(t) for _, t in items], batch_first=True),  # [S, U]
        target_lengths=target_lengths,
        positions=int(target_lengths.sum()),
    )


class CTCHead(nn.Module):
    """Adaptor outputs -> logits over the LLM's tokens (its frozen input embeddings) + blank."""

    def __init__(self, embeddings: Tensor):
        super().__init__()
        # Not a parameter and not saved: the LLM's table, read as it is.
        self.register_buffer("embeddings", embeddings.detach(), persistent=False)  # [V, D]
        self.blank = nn.Parameter(torch.zeros(embeddings.shape[1], dtype=embeddings.dtype,
                                              device=embeddings.device))  # [D]
        self.log_scale = nn.Parameter(torch.zeros((), dtype=embeddings.dtype,
                                                  device=embeddings.device))

    @property
    def blank_id(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, D] -> [B, T, V + 1] logits, the blank last."""
        table = torch.cat([self.embeddings, self.blank[None]])  # [V + 1, D]
        return (x @ table.T) * self.log_scale.exp()


class AlignModule(nn.Module):
    """forward(batch) -> (summed CTC loss, number of transcript tokens)."""

    def __init__(self, adaptor: SpeechAdaptor, embeddings: Tensor):
        super().__init__()
        self.adaptor = adaptor
        setattr(self, HEAD, CTCHead(embeddings))

    @classmethod
    def for_model(cls, model: OmniModel) -> AlignModule:
        return cls(model.adaptor, model.llm.model.get_input_embeddings().weight)

    def log_probs(self, batch: TranscriptBatch) -> tuple[Tensor, Tensor]:
        """([S, T, V + 1] float32 log-probabilities, [S] valid positions)."""
        frames = self.adaptor(batch.features.to(self.adaptor.linear1.weight.dtype))  # [S, T, D]
        lengths = self.adaptor.output_lengths(batch.feature_lengths)
        return self.head(frames).float().log_softmax(-1), lengths

    def forward(self, batch: TranscriptBatch) -> tuple[Tensor, Tensor]:
        log_probs, lengths = self.log_probs(batch)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1), batch.targets, lengths, batch.target_lengths,
            blank=self.head.blank_id, reduction="sum", zero_infinity=True,
        )
        return loss, batch.target_lengths.sum()

    @torch.no_grad()
    def greedy_tokens(self, batch: TranscriptBatch) -> list[list[int]]:
        """Best-path decode: the argmax token per position, repeats merged, blanks dropped."""
        log_probs, lengths = self.log_probs(batch)
        out = []
        for best, n in zip(log_probs.argmax(-1).tolist(), lengths.tolist()):
            tokens, previous = [], None
            for token in best[:n]:
                if token != previous and token != self.head.blank_id:
                    tokens.append(token)
                previous = token
            out.append(tokens)
        return out


def heldout_transcripts(
    module: AlignModule, dataset: TranscriptDataset, tokenizer: Any, batch_size: int = 8
) -> dict:
    """Word error rate (percent) of the greedy transcripts of held-out speech, with examples.

    What the adaptor carries, read back through the CTC head: a WER near 100 means it
    carries little of the words yet.
    """
    from llama_omni.eval.wer import corpus_wer

    was_training = module.training
    module.eval()
    references, hypotheses = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate_transcripts(items).to(module.head.blank.device)
        hypotheses += [tokenizer.decode(t) for t in module.greedy_tokens(batch)]
        references += [tokenizer.decode(t) for _, t in items]
    module.train(was_training)
    examples = [{"id": e.id, "reference": r, "transcript": h}
                for e, r, h in zip(dataset.examples, references, hypotheses)]
    return {"items": len(examples), "wer": corpus_wer(references, hypotheses),
            "examples": examples[:10]}
