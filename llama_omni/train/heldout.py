"""Held-out checks of a trained model: better answers (stage 1), intelligible units (stage 2).

Stage 1: the model answers held-out spoken questions (greedy, text only) and each answer
is scored against the reference answer with ROUGE-L F1 over words. Scoring the starting
model and the trained one gives the before / after comparison.
Stage 2: the states of the held-out reference answers (teacher-forced, as in training)
give greedy units; the vocoder turns them into speech, Whisper base transcribes it, and
the word error rate against the answer text says whether the units are intelligible.
The data's own units go through the same vocoder and ASR: the best the units can do.
Only the first exchange of each conversation is used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llama_omni.audio import SAMPLE_RATE, load_audio
from llama_omni.model.encoder import encode_audio
from llama_omni.model.omni import OmniModel
from llama_omni.train.batches import SpeechTextCollator, SpeechTextExample
from llama_omni.train.data import Conversation, tokenize
from llama_omni.train.stage1 import answer_states
from llama_omni.units.quality import Transcriber, corpus_wer, normalize_text


def rouge_l(reference: str, hypothesis: str) -> float:
    """F1 of the longest common word subsequence (words as in the ASR scoring)."""
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref or not hyp:
        return float(ref == hyp)
    prev = [0] * (len(hyp) + 1)
    for r in ref:
        cur = [0]
        for j, h in enumerate(hyp, 1):
            cur.append(prev[j - 1] + 1 if r == h else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_exchange(conversation: Conversation) -> Conversation:
    return Conversation(conversation.id, conversation.turns[:2])


@torch.no_grad()
def generated_answers(
    model: OmniModel, items: list[Conversation], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy text answers to each item's first spoken question (default prompt)."""
    from llama_omni.inference.engine import Engine, EngineOptions

    engine = Engine(model, None, EngineOptions(speech=False, max_new_tokens=max_new_tokens,
                                               overlap=False))
    answers = []
    for start in tqdm(range(0, len(items), batch_size), desc="answering", unit="batch"):
        waves = [load_audio(c.audio[0]) for c in items[start : start + batch_size]]
        answers += [a.text.strip() for a in engine.answer(waves)]
    return answers


@torch.no_grad()
def predicted_units(model: OmniModel, items: list[Conversation], *, batch_size: int) -> list[list[int]]:
    """Greedy units of each item's first reference answer, from teacher-forced states."""
    model.eval()
    collate = SpeechTextCollator(model.adaptor.config.downsample)
    units = []
    for start in tqdm(range(0, len(items), batch_size), desc="predicting units", unit="batch"):
        chunk = [first_exchange(c) for c in items[start : start + batch_size]]
        waves = [load_audio(c.audio[0]) for c in chunk]
        features, lengths = encode_audio(model.encoder, waves, model.config.encoder)  # [B, N, De]
        batch = collate([
            (SpeechTextExample(c.id, t.ids, t.labels, [], 0), [features[i, : int(lengths[i])]])
            for i, c in enumerate(chunk)
            for t in [tokenize(c, model.llm.tokenizer, model.config.llm)]
        ]).to(model.device)
        for (c,) in answer_states(model.adaptor, model.llm, batch):  # one answer per item
            units += model.speech_decoder.predict_units(c[None].to(model.dtype))
    return units


def evaluate(
    model: OmniModel,
    items: list[Conversation],
    *,
    vocoder: Any = None,
    max_new_tokens: int = 128,
    batch_size: int = 4,
    answers: bool = True,
) -> dict[str, Any]:
    """Scores over `items` (see the module doc) plus a few examples to read and listen to."""
    references = [c.turns[1].text for c in items]
    report: dict[str, Any] = {"items": len(items)}
    examples = [{"id": c.id, "reference": r} for c, r in zip(items, references)]
    if answers:
        texts = generated_answers(model, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
        scores = [rouge_l(r, t) for r, t in zip(references, texts)]
        report["rouge_l"] = sum(scores) / len(scores)
        for example, text, score in zip(examples, texts, scores):
            example.update(answer=text, rouge_l=round(score, 4))
    if vocoder is not None:
        asr = Transcriber()

        def transcribe(units: list[int]) -> str:
            wave = vocoder.vocode(units)
            return asr(_resample(wave, vocoder.config.sample_rate, SAMPLE_RATE)) if units else ""

        ours = predicted_units(model, items, batch_size=batch_size)
        heard = [transcribe(u) for u in tqdm(ours, desc="ASR")]
        report["units_asr_wer"] = corpus_wer(references, heard)
        truth = [list(c.turns[1].units or []) for c in items]
        scored = [(r, transcribe(u)) for r, u in zip(references, truth) if u]
        if scored:
            report["data_units_asr_wer"] = corpus_wer(*map(list, zip(*scored)))
        for example, units, text in zip(examples, ours, heard):
            example.update(units=len(units), heard=text)
    report["examples"] = examples
    return report


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def load_for_heldout(checkpoint: str | Path | None, config: Any) -> OmniModel:
    """A checkpoint directory, or (None) the run's starting model: the "before" of stage 1."""
    from llama_omni.model.checkpoint import load_model
    from llama_omni.train.model_setup import prepare_model

    model = load_model(checkpoint) if checkpoint is not None else prepare_model(config)
    return model.eval()
