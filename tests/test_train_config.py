"""Training configs (YAML + dotted overrides), shipped configs and the train CLI."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llama_omni.cli.main import app
from llama_omni.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, {"stage": "stage1", "output_dir": "runs/x", "data": {"train": "d"},
                            "optim": {"lr": "1e-4"}})
    cfg = TrainConfig.load(path, ["optim.lr=3e-5", "batch_size=16", "model.overrides.speech_decoder.unit_vocab=500",
                                  "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.optim.lr == 3e-5 and cfg.lr == 3e-5
    assert cfg.batch_size == 16 and cfg.model.overrides == {"speech_decoder": {"unit_vocab": 500}}
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert TrainConfig.load(path).optim.lr == 1e-4  # YAML reads 1e-4 as a string: coerced
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_stage_default_learning_rates(tmp_path):
    path = write(tmp_path, {"output_dir": "o", "data": {"train": "d"}})
    assert TrainConfig.load(path, ["stage=stage1"]).lr == 2e-5
    assert TrainConfig.load(path, ["stage=stage2"]).lr == 2e-4


def test_missing_required_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        TrainConfig.load(write(tmp_path, {"stage": "stage1", "data": {"train": "d"}}))


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "OptimSpec.lr"),
    ("batch_sise=4", "unknown field"),
    ("batch_size=30", "multiple of micro_batch_size"),
    ("tuning=qlora", "choose one of"),
    ("model.checkpoint=/x", "exactly one of model.preset and model.checkpoint"),
    ("distill=-1", "distill must be >= 0"),
    ("distill=0.5", "tuning 'lora' or 'adaptor'"),  # stage 1 with tuning full
    ("distill_system_prompt=Be brief.", "set distill > 0 too"),
])
def test_bad_values_are_named(tmp_path, override, message):
    path = write(tmp_path, {"stage": "stage1", "output_dir": "o", "data": {"train": "d"}})
    with pytest.raises(ValueError, match=message):
        TrainConfig.load(path, [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_load(path):
    cfg = TrainConfig.load(path)
    assert cfg.stage in path.name
    if path.name.startswith(("paper-8b", "small-stage")):  # the paper's recipe
        assert cfg.batch_size == 32 and cfg.epochs == 3 and cfg.optim.warmup_ratio == 0.03
        assert cfg.lr == {"stage1": 2e-5, "stage2": 2e-4}[cfg.stage]


@pytest.mark.parametrize("path", sorted((REPO / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1


def test_cli_help_and_typed_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "stage1" in result.output and "export" in result.output
    path = write(tmp_path, {"stage": "stage1", "output_dir": "o", "data": {"train": "d"}})
    result = runner.invoke(app, ["train", "stage2", str(path), "--lr", "1e-3", "--set", "epochs=1",
                                 "--checkpoint", "runs/s1/final", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["stage"] == "stage2" and printed["optim"]["lr"] == 1e-3 and printed["epochs"] == 1
    assert printed["model"]["checkpoint"] == "runs/s1/final" and printed["model"]["preset"] is None


def test_cosine_schedule_with_warmup():
    import torch

    from llama_omni.train.trainer import cosine_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    scheduler = cosine_with_warmup(optimizer, warmup=3, total=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[1] == pytest.approx(2e-5 / 3) and lrs[3] == pytest.approx(2e-5)
    assert lrs[3 + 97 // 2] == pytest.approx(1e-5, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] < 1e-8


def test_cpu_bf16_support_reads_the_cpu_flags(tmp_path):
    from llama_omni.train.run import cpu_bf16_support

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    sapphire = tmp_path / "spr"
    sapphire.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_bf16_support(avx2) is False
    assert cpu_bf16_support(sapphire) is True
    assert cpu_bf16_support(arm) is True
    assert cpu_bf16_support(tmp_path / "missing") is None  # not Linux: cannot tell
