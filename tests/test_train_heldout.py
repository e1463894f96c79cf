"""Held-out evaluation: ROUGE-L, generated answers, units from the training-time states."""

import pytest
import torch

from llama_omni.train.data import read_conversations
from llama_omni.train.heldout import evaluate, predicted_units, rouge_l, speech_dependence
from llama_omni.train.model_setup import prepare_model
from llama_omni.train.run import build_stage
from train_helpers import one_thread, save_small_vocab_llm, tiny_config, write_manifest  # noqa: F401


def test_rouge_l():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat sat on the mat", "a cat sat on a mat") == pytest.approx(2 / 3)
    assert rouge_l("a b", "c") == 0.0 and rouge_l("", "") == 1.0


def tiny_model(tmp_path, items: int, stage: str):
    """(config, untrained tiny model, its manifest directory)."""
    llm_dir = save_small_vocab_llm(tmp_path / "llm")
    data = write_manifest(tmp_path / "data", items=items)
    cfg = tiny_config(tmp_path, llm_dir, data, stage,
                      **{"model.overrides": {"llm": {"prompt_style": "chat-template"}}})
    torch.manual_seed(0)
    return cfg, prepare_model(cfg).eval(), data


def test_heldout_units_and_answers(tmp_path):
    cfg, model, data = tiny_model(tmp_path, 3, "stage2")
    stage = build_stage(cfg, model)
    items = read_conversations(data)
    # The units scored at evaluation come from the same states stage 2 trains on.
    expected = [model.speech_decoder.predict_units(stage.train[i][0][None])[0] for i in range(3)]
    assert predicted_units(model, items, batch_size=2) == expected

    report = evaluate(model, items, max_new_tokens=4, batch_size=2)
    assert report["items"] == 3 and 0.0 <= report["rouge_l"] <= 1.0
    assert all(e["answer"] is not None and "rouge_l" in e for e in report["examples"])
    assert report["speech_gain"] == pytest.approx(
        report["answer_loss_other_speech"] - report["answer_loss_own_speech"])


def test_speech_dependence_compares_own_with_another_items_speech(tmp_path):
    """Distinct speech: the losses differ. The same speech everywhere: no gain, exactly."""
    import json

    _, model, data = tiny_model(tmp_path, 4, "stage1")
    distinct = speech_dependence(model, read_conversations(data), batch_size=3)
    assert distinct["answer_loss_own_speech"] > 0
    assert distinct["answer_loss_own_speech"] != distinct["answer_loss_other_speech"]
    manifest = data / "manifest.jsonl"
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    for item in items:
        item["turns"][0]["audio"] = items[0]["turns"][0]["audio"]
    manifest.write_text("".join(json.dumps(i) + "\n" for i in items))
    same = speech_dependence(model, read_conversations(data), batch_size=3)
    assert same["speech_gain"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        speech_dependence(model, read_conversations(data)[:1], batch_size=3)


def test_units_scored_through_vocoder_and_asr(tmp_path, monkeypatch):
    """The plumbing of the stage-2 score: units -> vocoder -> 16 kHz -> ASR -> WER."""
    from types import SimpleNamespace

    import numpy as np

    from llama_omni.train import heldout

    class FakeVocoder:
        config = SimpleNamespace(sample_rate=24000)

        def vocode(self, units):
            return np.zeros(len(units) * 480, dtype=np.float32)  # 20 ms per unit

    heard = []

    class FakeASR:
        def __init__(self, **options):
            pass

        def __call__(self, audio):
            heard.append(len(audio))
            return "the cat sleeps"

    monkeypatch.setattr(heldout, "ASR", FakeASR)
    llm_dir = save_small_vocab_llm(tmp_path / "llm")
    data = write_manifest(tmp_path / "data", items=2)
    cfg = tiny_config(tmp_path, llm_dir, data, "stage2",
                      **{"model.overrides": {"llm": {"prompt_style": "chat-template"}}})
    model = prepare_model(cfg).eval()
    items = read_conversations(data)
    report = evaluate(model, items, vocoder=FakeVocoder(), answers=False, batch_size=2)
    ours = predicted_units(model, items, batch_size=2)
    truth = [len(c.turns[1].units) for c in items]
    assert heard == [len(u) * 320 for u in ours] + [n * 320 for n in truth]  # resampled to 16 kHz
    # references: "Sure, it is sunny." (4 words, 4 errors), "The cat sleeps." (0 errors)
    assert report["units_asr_wer"] == report["data_units_asr_wer"] == pytest.approx(100 * 4 / 7)
