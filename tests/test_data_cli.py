"""`llama-omni data ...`: help texts, shipped configs, one-line errors."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llama_omni.cli.data import data_app
from llama_omni.data.config import DataConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "data").glob("*.yaml"))


def test_help_lists_the_steps():
    result = CliRunner().invoke(data_app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "rewrite", "respond", "synthesize", "units", "export",
                    "import-published", "serve-llm"):
        assert command in result.output


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = DataConfig.load(path)
    assert config.out.startswith("runs/data/") and config.source.kind == "sharegpt"


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nsource: {kind: csv}\n")
    with pytest.raises(ValueError, match="source.kind 'csv'"):
        DataConfig.load(bad)
    bad.write_text("out: x\nllm: {kind: openai}\n")
    with pytest.raises(ValueError, match="base_url is required"):
        DataConfig.load(bad)
    bad.write_text("out: x\ntypo_field: 1\n")
    with pytest.raises(ValueError, match="unknown field"):
        DataConfig.load(bad)


def test_build_steps_option_orders_and_checks_names(tmp_path):
    from llama_omni.cli.data import parse_steps

    assert parse_steps("synthesize, rewrite,respond") == ("rewrite", "respond", "synthesize")
    result = CliRunner().invoke(data_app, ["build", str(CONFIGS[0]), "--steps", "rewrite,tts",
                                           "--out", str(tmp_path / "d")])
    assert result.exit_code != 0 and "tts" in result.output and "synthesize" in result.output
    assert not (tmp_path / "d").exists()
