"""The align stage: CTC from the adaptor onto the LLM's token embeddings of the transcripts."""

import json
from pathlib import Path

import pytest
import torch

from llama_omni.model.checkpoint import load_model
from llama_omni.train.align import AlignModule, collate_transcripts
from llama_omni.train.data import DataError
from llama_omni.train.export import export_run
from llama_omni.train.model_setup import prepare_model
from llama_omni.train.run import build_stage, train
from train_helpers import ANSWERS, one_thread, save_small_vocab_llm, tiny_config, write_manifest  # noqa: F401

CHATML = {"llm": {"prompt_style": "chat-template"}}


@pytest.fixture(scope="module")
def small_llm_dir(tmp_path_factory):
    return save_small_vocab_llm(tmp_path_factory.mktemp("small-llm"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Questions whose transcripts are in the small LLM's vocabulary, long enough for CTC."""
    return write_manifest(tmp_path_factory.mktemp("data"), items=3, seconds=1.2,
                          transcripts=ANSWERS[:3])


def setup(tmp_path, llm_dir, data, **values):
    cfg = tiny_config(tmp_path, llm_dir, data, "align", **{"model.overrides": CHATML, **values})
    torch.manual_seed(0)
    model = prepare_model(cfg)
    return cfg, model, build_stage(cfg, model)


def test_only_the_adaptor_and_the_ctc_head_get_gradients(tmp_path, small_llm_dir, data):
    _, model, stage = setup(tmp_path, small_llm_dir, data)
    batch = stage.collate([stage.train[i] for i in range(2)])
    loss, count = stage.module.train()(batch)
    assert count == batch.target_lengths.sum() and loss > 0
    (loss / count).backward()
    got = {n for n, p in stage.module.named_parameters() if p.grad is not None}
    adaptor = {f"adaptor.{n}" for n, _ in model.adaptor.named_parameters()}
    assert got == adaptor | {"head.blank", "head.log_scale"}
    assert not any(p.grad is not None for p in model.llm.parameters())
    # the head reads the LLM's own table, and does not save it
    table = model.llm.model.get_input_embeddings().weight
    assert torch.equal(stage.module.head.embeddings, table)
    assert "head.embeddings" not in stage.module.state_dict()


def test_overfits_one_batch_to_the_transcript_tokens(tmp_path, small_llm_dir, data):
    _, model, stage = setup(tmp_path, small_llm_dir, data)
    items = [stage.train[i] for i in range(3)]
    batch = collate_transcripts(items)
    module = stage.module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(300):
        loss, count = module(batch)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach() / count))
    assert losses[-1] < 0.05 * losses[0], losses[::30]
    assert module.eval().greedy_tokens(batch) == [tokens for _, tokens in items]


def test_run_exports_a_checkpoint_that_starts_stage1(tmp_path, small_llm_dir, data):
    cfg = tiny_config(tmp_path, small_llm_dir, data, "align", **{
        "model.overrides": CHATML, "data.eval_fraction": 0.5, "max_steps": 4})
    final = train(cfg)
    run = Path(cfg.output_dir)
    report = json.loads((run / "heldout-transcripts.json").read_text())
    assert report["items"] >= 1 and report["wer"] >= 0 and report["examples"][0]["reference"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "heldout_transcripts" for e in events)
    # the exported adaptor is the trained one (the head is left out); the LLM is untouched
    trained = load_model(final)
    fresh = prepare_model(cfg)
    assert not torch.equal(trained.adaptor.linear1.weight, fresh.adaptor.linear1.weight)
    for (name, a), (_, b) in zip(trained.llm.named_parameters(), fresh.llm.named_parameters()):
        assert torch.equal(a, b), name
    again = export_run(run, tmp_path / "exported")  # `llama-omni train export` of the run
    assert torch.equal(load_model(again).adaptor.linear1.weight, trained.adaptor.linear1.weight)
    # stage 1 starts from it
    stage1 = tiny_config(tmp_path / "s1", small_llm_dir, data, "stage1", **{
        "model.preset": None, "model.checkpoint": str(final)})
    model = prepare_model(stage1)
    assert torch.equal(model.adaptor.linear1.weight, trained.adaptor.linear1.weight)


def test_turns_too_short_for_their_tokens_are_skipped(tmp_path, small_llm_dir):
    """0.2 s of speech gives 2 adaptor positions: not enough for a 5-token transcript."""
    data = write_manifest(tmp_path / "data", items=3, seconds=0.2,
                          transcripts=["Sure, it is sunny.", "Hello"])
    _, _, stage = setup(tmp_path, small_llm_dir, data)
    assert [e.id for e in stage.train.examples] == ["item-1/0"]


def test_a_spoken_turn_without_transcript_is_a_clear_error(tmp_path, small_llm_dir):
    data = write_manifest(tmp_path / "data", items=2, seconds=1.2)
    manifest = data / "manifest.jsonl"
    items = [json.loads(line) for line in manifest.read_text().splitlines()]
    del items[1]["turns"][0]["text"]
    manifest.write_text("".join(json.dumps(i) + "\n" for i in items))
    with pytest.raises(DataError, match="item-1.*no transcript"):
        setup(tmp_path, small_llm_dir, data)


def test_config_rejects_tuning_for_align(tmp_path, small_llm_dir, data):
    with pytest.raises(ValueError, match="tuning applies to stage 1 only"):
        tiny_config(tmp_path, small_llm_dir, data, "align", tuning="lora")
    assert tiny_config(tmp_path, small_llm_dir, data, "align", **{"optim.lr": None}).lr == 1e-3


def test_align_module_for_model_shares_the_adaptor(tmp_path, small_llm_dir, data):
    _, model, _ = setup(tmp_path, small_llm_dir, data)
    module = AlignModule.for_model(model)
    assert module.adaptor is model.adaptor
    assert module.head.blank_id == model.llm.model.get_input_embeddings().weight.shape[0]
