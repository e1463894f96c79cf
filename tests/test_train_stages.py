"""Stage 1 and stage 2: which parameters train, overfitting one batch, the decoder's inputs, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_omni.model.checkpoint import load_model
from llama_omni.train.export import export_checkpoint
from llama_omni.train.model_setup import prepare_model
from llama_omni.train.run import build_stage, train
from llama_omni.model.prompt import DEFAULT_INSTRUCTION, IGNORE_INDEX, SPEECH_TOKEN_INDEX
from llama_omni.train.data import DataError
from llama_omni.train.stage1 import (
    Stage1Module,
    answer_states,
    divergence,
    teacher_forced,
    written_logits,
)
from train_helpers import one_thread, save_small_vocab_llm, tiny_config, write_manifest  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "llama-omni"
CHATML = {"llm": {"prompt_style": "chat-template"}}
SHARPEN = 30.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), items=3)


@pytest.fixture(scope="module")
def small_llm_dir(tmp_path_factory):
    return save_small_vocab_llm(tmp_path_factory.mktemp("small-llm"))


def setup(tmp_path, llm_dir, data, stage, **values):
    cfg = tiny_config(tmp_path, llm_dir, data, stage, **values)
    torch.manual_seed(0)
    model = prepare_model(cfg)
    stage_data = build_stage(cfg, model)
    batch = stage_data.collate([stage_data.train[i] for i in range(2)])
    return model, stage_data.module, batch


@pytest.mark.parametrize("stage, tuning", [
    ("stage1", "full"), ("stage1", "lora"), ("stage1", "adaptor"), ("stage2", "full"),
])
def test_exactly_the_intended_parameters_get_gradients(tmp_path, tiny_llm_dir, data, stage, tuning):
    model, module, batch = setup(tmp_path, tiny_llm_dir, data, stage, tuning=tuning)
    loss, count = module.train()(batch)
    (loss / count).backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    names = [name for name, _ in model.named_parameters()]
    expected = {
        ("stage1", "full"): {n for n in names if n.startswith(("adaptor.", "llm."))},
        ("stage1", "lora"): {n for n in names if n.startswith("adaptor.") or "lora_" in n},
        ("stage1", "adaptor"): {n for n in names if n.startswith("adaptor.")},
        ("stage2", "full"): {n for n in names if n.startswith("speech_decoder.")},
    }[stage, tuning]
    assert got == trainable == expected
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in got)
    if tuning == "lora":
        assert any("lora_B" in n for n in got) and not any("base_layer" in n for n in got)


@pytest.mark.parametrize("stage, lr, steps", [("stage1", 1e-2, 40), ("stage2", 3e-3, 150)])
def test_overfits_one_batch(tmp_path, small_llm_dir, data, stage, lr, steps):
    """Loss near zero, and greedy predictions equal the targets (answer tokens / units)."""
    model, module, batch = setup(tmp_path, small_llm_dir, data, stage, **{"model.overrides": CHATML})
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, count = module.train()(batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach() / count))
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.2, losses[:: steps // 10]
    module.eval()
    with torch.no_grad():
        if stage == "stage1":
            logits = teacher_forced(model.adaptor, model.llm, batch).logits[:, :-1]
            targets = batch.labels[:, 1:]
            supervised = targets != IGNORE_INDEX
            assert torch.equal(logits.argmax(-1)[supervised], targets[supervised])
        else:
            units = model.speech_decoder.predict_units(batch.hidden, batch.lengths)
            assert units == [[u for u in row if u != IGNORE_INDEX] for row in batch.units.tolist()]


@pytest.mark.parametrize("token_input", [False, True])
def test_stage2_inputs_are_the_models_answer_states(tmp_path, tiny_llm_dir, data, token_input):
    """c_i gathered from one whole-conversation pass equals OmniModel.answer_states
    (with token_input: [c_i ; embedding of answer token i] in both)."""
    model, module, batch = setup(tmp_path, tiny_llm_dir, data, "stage1")
    model.eval()
    if token_input:
        width = 2 * model.config.llm.hidden_size
        decoder = model.config.speech_decoder.replace(token_input=True, input_width=width)
        model.config = model.config.replace(speech_decoder=decoder)
    ours = answer_states(model.adaptor, model.llm, batch, model.config.speech_decoder)
    frames = model.adaptor(batch.features)  # [S, N/k, D]
    counts = model.adaptor.output_lengths(batch.feature_lengths)
    speech = [frames[s, : int(n)] for s, n in enumerate(counts)]
    prompts, answers = [], []
    for ids, labels in zip(batch.ids, batch.labels.tolist()):
        start = next(i for i, x in enumerate(labels) if x != -100)  # one slot before it: k positions
        offset = int(counts[len(prompts)]) - 1  # the speech slot is one id but n embeddings
        prompts.append(ids[: start - offset])
        answers.append(ids[start - offset :])
    with torch.no_grad():
        _, reference, lengths = model.answer_states(speech, prompts, answers)
    for b, (item, n) in enumerate(zip(ours, lengths.tolist())):
        assert item[0].shape[-1] == model.config.speech_decoder.input_width
        torch.testing.assert_close(item[0], reference[b, :n], atol=1e-5, rtol=1e-5)


def test_distillation_teacher_is_the_backbone_reading_the_transcript(tmp_path, tiny_llm_dir, data):
    plain, _, batch = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning="adaptor", distill=1.0)
    model, _, lora_batch = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning="lora", distill=1.0)
    assert lora_batch.written_ids == batch.written_ids
    assert all(SPEECH_TOKEN_INDEX not in ids for ids in batch.written_ids)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # LoRA now changes the LLM's outputs
    model.eval()
    teacher = written_logits(model.llm, lora_batch)  # [T, V]
    torch.testing.assert_close(teacher, written_logits(plain.llm, batch))
    assert teacher.shape[0] == int((batch.labels != IGNORE_INDEX).sum())
    with torch.no_grad():  # the adapters are on again after the teacher's pass
        embeds, mask, positions = model.llm.embed_prompt(lora_batch.written_ids, [], "right")
        logits = model.llm(embeds, mask, positions).logits[:, :-1]
    adapted = logits[lora_batch.written_labels[:, 1:] != IGNORE_INDEX]
    assert (adapted - teacher).abs().max() > 1e-2


def test_distillation_reads_published_records_with_transcripts(tmp_path, tiny_llm_dir, data):
    """A published record's "transcript" is its written question, the spelt-out instruction
    dropped: the teacher reads what it reads for the same item of a manifest."""
    records = []
    for item in (json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()):
        question, answer = item["turns"]
        records.append({"id": item["id"], "speech": str(data / question["audio"]),
                        "transcript": question["text"], "conversations": [
                            {"from": "human", "value": f"<speech>\n{DEFAULT_INSTRUCTION}"},
                            {"from": "gpt", "value": answer["text"]}]})
    published = tmp_path / "published.json"
    published.write_text(json.dumps(records))
    _, _, batch = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning="adaptor", distill=1.0)
    _, _, from_json = setup(tmp_path, tiny_llm_dir, published, "stage1", tuning="adaptor",
                            distill=1.0)
    assert from_json.written_ids == batch.written_ids
    torch.testing.assert_close(from_json.written_labels, batch.written_labels)

    for record in records:
        del record["transcript"]
    published.write_text(json.dumps(records))
    with pytest.raises(DataError, match="a published record's 'transcript'"):
        setup(tmp_path, tiny_llm_dir, published, "stage1", tuning="adaptor", distill=1.0)


def test_distillation_teacher_reads_its_own_system_prompt(tmp_path, tiny_llm_dir, data):
    """distill_system_prompt replaces the system prompt of the written conversations only."""
    model, _, plain = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning="adaptor", distill=1.0)
    _, _, batch = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning="adaptor", distill=1.0,
                        distill_system_prompt="Answer in one short sentence.")
    decode = model.llm.tokenizer.decode
    assert batch.ids == plain.ids  # the spoken conversations keep the model's prompt
    own = model.config.llm.system_prompt
    for ids, plain_ids in zip(batch.written_ids, plain.written_ids):
        assert "Answer in one short sentence." in decode(ids) and own not in decode(ids)
        assert own in decode(plain_ids)
    answers = batch.written_labels[batch.written_labels != IGNORE_INDEX]
    assert torch.equal(answers, plain.written_labels[plain.written_labels != IGNORE_INDEX])


@pytest.mark.parametrize("tuning", ["lora", "adaptor"])
def test_distillation_adds_a_positive_term_in_training_only(tmp_path, tiny_llm_dir, data, tuning):
    model, module, batch = setup(tmp_path, tiny_llm_dir, data, "stage1", tuning=tuning,
                                 distill=0.5, **{"lora.dropout": 0.0})
    loss, count = module.train()(batch)
    (loss / count).backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == {name for name, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        cross_entropy = Stage1Module(model.adaptor, model.llm).train()(batch)[0]
        assert float(loss) > float(cross_entropy) + 1e-3
        torch.testing.assert_close(module.eval()(batch)[0], cross_entropy)


def test_distillation_pulls_spoken_answers_toward_the_written_ones(tmp_path, small_llm_dir, data):
    """Same steps from the same start: the KL to the written question's answers ends much
    lower with the distillation term than with the cross-entropy alone."""
    def train(distill):
        model, module, batch = setup(tmp_path, small_llm_dir, data, "stage1", tuning="adaptor",
                                     distill=distill, **{"model.overrides": CHATML})
        with torch.no_grad():  # sharper distributions than a random LLM's near-uniform ones
            model.llm.model.get_output_embeddings().weight.mul_(SHARPEN)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(40):
            loss, count = module.train()(batch)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            student = teacher_forced(model.adaptor, model.llm, batch).logits[:, :-1]
            student = student[batch.labels[:, 1:] != IGNORE_INDEX].float()
            teacher = written_logits(model.llm, batch) if distill else None
            return student, teacher

    with_kl, teacher = train(1.0)
    without, _ = train(0.0)
    # measured: 4.3 vs 8.8 (the cross-entropy pulls toward the data's tokens meanwhile)
    assert float(divergence(with_kl, teacher)) < 0.6 * float(divergence(without, teacher))


@pytest.mark.parametrize("merge", [True, False])
def test_export_lora(tmp_path, small_llm_dir, data, merge):
    model, module, batch = setup(tmp_path, small_llm_dir, data, "stage1", tuning="lora",
                                 **{"model.overrides": CHATML, "lora.dropout": 0.0})
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, count = module(batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.eval()
    with torch.no_grad():
        expected = module(batch)[0]
    out = export_checkpoint(model, tmp_path / "export", llm_trained=True, merge=merge,
                            base_dir=small_llm_dir)
    loaded = load_model(out)  # an unmerged adapter is folded in without peft
    assert (out / "lora").is_dir() != merge and (out / "llm").is_dir() == merge
    with torch.no_grad():
        got = Stage1Module(loaded.adaptor, loaded.llm).eval()(batch)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_distillation_teacher_of_a_folded_lora_checkpoint_is_the_untouched_backbone(
        tmp_path, small_llm_dir, data):
    """A checkpoint's LoRA is folded into the weights when it loads; the teacher must still
    be the backbone as released, not the tuned one."""
    model, _, base_batch = setup(tmp_path, small_llm_dir, data, "stage1", tuning="lora",
                                 distill=1.0, **{"model.overrides": CHATML})
    base = written_logits(model.llm, base_batch)  # [T, V], adapters switched off
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    out = export_checkpoint(model, tmp_path / "export", llm_trained=True, merge=False,
                            base_dir=small_llm_dir)
    cfg = tiny_config(tmp_path, small_llm_dir, data, "stage1", tuning="adaptor", distill=1.0,
                      **{"model.preset": None, "model.checkpoint": str(out)})
    folded = prepare_model(cfg)
    stage = build_stage(cfg, folded)
    batch = stage.collate([stage.train[i] for i in range(2)])
    assert folded.llm.folded_adapter is not None and stage.module.teacher is not None
    assert not any(p.requires_grad for p in stage.module.teacher.parameters())
    stage.module.train()
    assert not stage.module.teacher.training
    torch.testing.assert_close(written_logits(stage.module.teacher, batch), base,
                               atol=1e-4, rtol=1e-4)
    assert (written_logits(folded.llm, batch) - base).abs().max() > 1e-2  # the tuned LLM

    final = train(cfg.replace(max_steps=2, save_every=1000))  # exports without the teacher
    trained = load_model(final)
    assert not torch.equal(trained.adaptor.linear1.weight, folded.adaptor.linear1.weight)
    assert (final / "lora").is_dir()


def test_decoder_override_on_a_checkpoint_keeps_weights_only_when_they_fit(tmp_path, tiny_llm_dir, data):
    model, _, _ = setup(tmp_path, tiny_llm_dir, data, "stage2")
    out = export_checkpoint(model, tmp_path / "export", llm_trained=False, base_dir=tiny_llm_dir)
    trained = model.speech_decoder.state_dict()

    def restart(**decoder):
        cfg = tiny_config(tmp_path, tiny_llm_dir, data, "stage2", **{
            "model.preset": None, "model.checkpoint": str(out),
            "model.overrides": {"speech_decoder": decoder}})
        return prepare_model(cfg).speech_decoder

    windowed = restart(attention_window=50)
    assert windowed.config.attention_window == 50
    assert all(torch.equal(windowed.state_dict()[k], v) for k, v in trained.items())
    fresh = restart(unit_vocab=16)
    assert fresh.output_proj.weight.shape[0] == 17
    assert not torch.equal(fresh.input_proj.weight, trained["input_proj.weight"])



def test_bf16_mixed_precision_stage2_learns_and_keeps_fp32_weights(tmp_path, small_llm_dir, data):
    """`--precision bf16` on a CPU: the decoder computes under bf16 autocast (1.5x faster per
    step on the default decoder here), the weights stay fp32, and the loss still falls.
    One process per run: accelerate fixes the precision once per process."""

    def run(precision: str) -> list[float]:
        out = tmp_path / precision
        subprocess.run(
            [str(CLI), "train", "stage2", str(REPO / "configs/train/tiny-stage2.yaml"),
             "--data", str(data), "--output-dir", str(out), "--precision", precision,
             "--max-steps", "12", "--set", f"model.base_dir={small_llm_dir}",
             "--set", "model.overrides.llm.prompt_style=chat-template",
             "--set", f"data.cache_dir={tmp_path / 'cache'}"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True,
        )
        events = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [e["loss"] for e in events if "loss" in e]

    fp32, bf16 = run("fp32"), run("bf16")
    assert bf16[-1] < 0.7 * bf16[0], bf16
    assert bf16 != fp32  # autocast really changed the arithmetic
    assert abs(bf16[0] - fp32[0]) < 0.05 * fp32[0]  # the same first step up to bf16 rounding
    weights = load_file(tmp_path / "bf16" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
