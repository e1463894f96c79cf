"""Held-out checks of a trained model: better answers (stage 1), intelligible units (stage 2).

Stage 1: the model answers held-out spoken questions (greedy, text only) and each answer
is scored against the reference answer with ROUGE-L F1 over words. Scoring the starting
model and the trained one gives the before / after comparison.
Stage 2: the states of the held-out reference answers (teacher-forced, as in training)
give greedy units; the vocoder turns them into speech, Whisper base transcribes it, and
the word error rate against the answer text says whether the units are intelligible.
The data's own units go through the same vocoder and ASR: the best the units can do.
Both: the speech dependence, the reference answers' teacher-forced loss after each
question's own speech vs after another item's (`speech_dependence`): the one check that
the answers use the question at all.
Only the first exchange of each conversation is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llama_omni.audio import SAMPLE_RATE, load_audio, resample
from llama_omni.data.normalize import normalize_english
from llama_omni.eval.wer import corpus_wer
from llama_omni.model.encoder import encode_audio
from llama_omni.model.omni import OmniModel
from llama_omni.train.batches import SpeechTextCollator, SpeechTextExample
from llama_omni.train.data import Conversation, tokenize
from llama_omni.train.stage1 import Stage1Module, answer_states
from llama_omni.units.quality import ASR


def rouge_l(reference: str, hypothesis: str) -> float:
    """F1 of the longest common word subsequence (words as in the ASR scoring)."""
    ref, hyp = normalize_english(reference).split(), normalize_english(hypothesis).split()
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


def _features(model: OmniModel, items: list[Conversation], batch_size: int) -> list[torch.Tensor]:
    """[N_i, De] encoder features of each item's first question."""
    out = []
    for start in range(0, len(items), batch_size):
        waves = [load_audio(c.audio[0]) for c in items[start : start + batch_size]]
        features, lengths = encode_audio(model.encoder, waves, model.config.encoder)  # [B, N, De]
        out += [features[i, : int(n)] for i, n in enumerate(lengths)]
    return out


def _first_exchanges(model: OmniModel, items: list[Conversation], features: list[torch.Tensor]):
    """A training batch of the items' first exchanges, with the given speech features."""
    collate = SpeechTextCollator(model.adaptor.config.downsample)
    return collate([
        (SpeechTextExample(c.id, t.ids, t.labels, [], 0), [f])
        for c, f in zip(items, features)
        for t in [tokenize(first_exchange(c), model.llm.tokenizer, model.config.llm)]
    ]).to(model.device)


@torch.no_grad()
def unit_log_probs(model: OmniModel, items: list[Conversation], *, batch_size: int) -> list[torch.Tensor]:
    """[T, K+1] speech-decoder log-probabilities of each item's first reference answer,
    from teacher-forced states."""
    model.eval()
    features = _features(model, items, batch_size)
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc="predicting units", unit="batch"):
        end = start + batch_size
        batch = _first_exchanges(model, items[start:end], features[start:end])
        states = answer_states(model.adaptor, model.llm, batch, model.config.speech_decoder)
        for (c,) in states:  # one answer per item
            log_probs, _ = model.speech_decoder(c[None].to(model.dtype))  # [1, T, K+1]
            out.append(log_probs[0])
    return out


def predicted_units(model: OmniModel, items: list[Conversation], *, batch_size: int) -> list[list[int]]:
    """Greedy units of each item's first reference answer, from teacher-forced states."""
    decoder = model.speech_decoder
    return [decoder.greedy_units(lp[None])[0]
            for lp in unit_log_probs(model, items, batch_size=batch_size)]


@torch.no_grad()
def speech_dependence(model: OmniModel, items: list[Conversation], *, batch_size: int) -> dict:
    """Teacher-forced loss of the reference answers after each question's own speech and
    after another item's speech (the items' speech rotated by half their number).

    A model that reads the question does clearly better with its own speech. Equal losses
    mean the answers ignore the speech: learnt from the answers' style alone, which a
    falling training loss does not reveal.
    """
    if len(items) < 2:
        raise ValueError("speech dependence compares items: give at least two")
    model.eval()
    features = _features(model, items, batch_size)
    module = Stage1Module(model.adaptor, model.llm).eval()
    shift = len(items) // 2

    def loss(speech: list[torch.Tensor]) -> float:
        total = count = 0.0
        for start in range(0, len(items), batch_size):
            end = start + batch_size
            summed, n = module(_first_exchanges(model, items[start:end], speech[start:end]))
            total, count = total + float(summed), count + int(n)
        return total / count

    own = loss(features)
    other = loss(features[shift:] + features[:shift])
    return {"answer_loss_own_speech": own, "answer_loss_other_speech": other,
            "speech_gain": other - own}


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
    if len(items) > 1:
        report.update(speech_dependence(model, items, batch_size=batch_size))
    examples = [{"id": c.id, "reference": r} for c, r in zip(items, references)]
    if answers:
        texts = generated_answers(model, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
        scores = [rouge_l(r, t) for r, t in zip(references, texts)]
        report["rouge_l"] = sum(scores) / len(scores)
        for example, text, score in zip(examples, texts, scores):
            example.update(answer=text, rouge_l=round(score, 4))
    if vocoder is not None:
        asr = ASR(threads=torch.get_num_threads())

        ours = predicted_units(model, items, batch_size=batch_size)
        heard = [hear_units(u, vocoder, asr) for u in tqdm(ours, desc="ASR")]
        report["units_asr_wer"] = corpus_wer(references, heard)
        truth = [list(c.turns[1].units or []) for c in items]
        scored = [(r, hear_units(u, vocoder, asr)) for r, u in zip(references, truth) if u]
        if scored:
            report["data_units_asr_wer"] = corpus_wer(*map(list, zip(*scored)))
        for example, units, text in zip(examples, ours, heard):
            example.update(units=len(units), heard=text)
    report["examples"] = examples
    return report


def hear_units(units: list[int], vocoder: Any, asr: ASR) -> str:
    """What the ASR hears in `units` spoken by the vocoder ("" for no units)."""
    if not units:
        return ""
    return asr(resample(vocoder.vocode(units), vocoder.config.sample_rate, SAMPLE_RATE))


def load_for_heldout(checkpoint: str | Path | None, config: Any) -> OmniModel:
    """A checkpoint directory, or (None) the run's starting model: the "before" of stage 1."""
    from llama_omni.model.checkpoint import load_model
    from llama_omni.train.model_setup import prepare_model

    model = load_model(checkpoint) if checkpoint is not None else prepare_model(config)
    return model.eval()
