"""Vocoder training: the iSTFT head, discriminators, data alignment, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, load_vocoder
from llama_omni.train.discriminators import Discriminators, mel_loss
from llama_omni.train.vocoder import VocoderTrainConfig, VocoderTrainer
from llama_omni.train.vocoder_data import VocoderData, save_frame_units

HOP = 320


def test_istft_head_length_and_validation():
    config = VocoderConfig.preset("tiny-istft-test")
    assert config.hop_length == HOP
    wave = UnitVocoder(config).eval()(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 1, 3]]))
    assert wave.shape == (1, 1, 6 * HOP) and wave.abs().max() <= 1.0
    with pytest.raises(ValueError, match="overlap"):
        config.replace(istft_n_fft=16, istft_hop=16)
    with pytest.raises(ValueError, match="both 0"):
        config.replace(istft_hop=0)


def test_discriminators_score_every_sub_discriminator():
    wave = torch.randn(2, 1, 4000) * 0.1
    outputs = Discriminators(width=0.0625)(wave)
    assert len(outputs) == 8  # 5 periods + 3 scales
    for scores, features in outputs:
        assert scores.shape[0] == 2 and len(features) >= 5
    assert mel_loss(wave, wave).item() == 0.0


@pytest.fixture()
def corpus(tmp_path):
    """Three utterances whose audio is a ramp of the frame index, to check alignment."""
    (tmp_path / "wav").mkdir()
    rows, units = [], {}
    for i, frames in enumerate((30, 41, 55)):
        uid = f"u{i}"
        audio = np.repeat(np.arange(frames) % 50, HOP).astype(np.float32) / 100.0
        sf.write(tmp_path / "wav" / f"{uid}.wav", audio, 16000, subtype="PCM_16")
        rows.append(dict(id=uid, text="x", split="train", samples=len(audio)))
        units[uid] = np.arange(frames) % 32
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_frame_units(tmp_path / "units.npz", units)
    return tmp_path


def test_batches_are_aligned_and_a_function_of_the_step(corpus):
    data = VocoderData(corpus, corpus / "units.npz")
    batch = data.batch(seed=0, step=5, batch_size=4, frames=12)
    assert batch.units.shape == (4, 12) and batch.wave.shape == (4, 1, 12 * HOP)
    # The ramp value of each 20 ms frame is its unit id (units are frame index % 32,
    # audio is frame index % 50 over 100): they agree wherever both are below 32.
    first = batch.wave[:, 0, ::HOP] * 100  # [B, 12]
    keep = first.round() < 32
    assert torch.equal(first.round()[keep].long(), batch.units[keep])
    again = data.batch(seed=0, step=5, batch_size=4, frames=12)
    assert torch.equal(batch.units, again.units) and torch.equal(batch.wave, again.wave)
    assert (batch.dur_targets.sum(dim=1) > 0).all()


def _trainer(corpus, run_dir, export_dir=None):
    config = VocoderTrainConfig(vocoder=VocoderConfig.preset("tiny-istft-test"), disc_width=0.0625,
                                gan_start_step=2, steps=3, batch_size=2, segment_frames=8, checkpoint_every=2,
                                log_every=1, threads=1)
    data = VocoderData(corpus, corpus / "units.npz")
    return VocoderTrainer(config, run_dir, data, export_dir,
                          samples={"u0": np.arange(10) % 32})


def _flat_state(trainer) -> dict[str, torch.Tensor]:
    state = trainer.state()
    flat = {f"g.{k}": v for k, v in state["generator"].items()}
    flat |= {f"d.{k}": v for k, v in state["discriminators"].items()}
    for name in ("opt_g", "opt_d"):
        for pid, slots in state[name]["state"].items():
            flat |= {f"{name}.{pid}.{k}": torch.as_tensor(v) for k, v in slots.items()}
    return flat


def test_training_resumes_bit_for_bit(corpus, tmp_path):
    straight = _trainer(corpus, tmp_path / "straight")
    straight.train()
    assert straight.step == 3

    interrupted = _trainer(corpus, tmp_path / "interrupted", export_dir=tmp_path / "export")
    interrupted.config.steps = 2  # stops right after the step-2 checkpoint, like a kill
    interrupted.train()
    resumed = _trainer(corpus, tmp_path / "interrupted")
    assert resumed.maybe_resume() and resumed.step == 2
    resumed.train()

    a, b = _flat_state(straight), _flat_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(straight.state()["torch_rng"], resumed.state()["torch_rng"])
    assert straight.sched_g.get_last_lr() == resumed.sched_g.get_last_lr()

    exported = load_vocoder(tmp_path / "export")  # the shippable generator, as at step 2
    assert exported.vocode([1, 2, 3]).ndim == 1
    assert sorted(p.name for p in (tmp_path / "interrupted" / "samples").iterdir())[0].startswith("u0")
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().split("\n") if line]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["mel"]) for r in log)


def test_resume_refuses_another_model_config(corpus, tmp_path):
    trainer = _trainer(corpus, tmp_path / "run")
    trainer.save_checkpoint()
    other = _trainer(corpus, tmp_path / "run")
    other.config.disc_width = 0.125
    with pytest.raises(ValueError, match="different model config"):
        other.maybe_resume()


def test_vocoder_train_cli_function(corpus, tmp_path):
    from llama_omni.cli.vocoder import vocoder_train

    vocoder_train(corpus=corpus, units=corpus / "units.npz", run_dir=tmp_path / "run",
                  num_units=32, export_dir=tmp_path / "export", preset="tiny-istft-test",
                  steps=2, batch_size=2, segment_frames=8, disc_width=0.0625,
                  checkpoint_every=1, samples=0)
    assert (tmp_path / "run" / "last.pt").is_file()
    assert load_vocoder(tmp_path / "export").config.num_units == 32


def test_a_new_run_starts_from_a_saved_generator(corpus, tmp_path):
    from llama_omni.cli.vocoder import vocoder_train
    from llama_omni.model.vocoder import save_vocoder

    donor = UnitVocoder(VocoderConfig.preset("tiny-istft-test"))
    torch.nn.init.normal_(donor.dict.weight, std=3.0)  # far from a fresh initialization
    save_vocoder(donor, tmp_path / "donor")
    vocoder_train(corpus=corpus, units=corpus / "units.npz", run_dir=tmp_path / "run",
                  num_units=32, export_dir=tmp_path / "export", preset="tiny-istft-test",
                  steps=1, batch_size=2, segment_frames=8, disc_width=0.0625,
                  checkpoint_every=1, samples=0, init_generator=tmp_path / "donor")
    trained = load_vocoder(tmp_path / "export")
    moved = (trained.dict.weight - donor.dict.weight).abs().max().item()
    assert 0 < moved < 0.01  # one small step away from the donor, not from a fresh start

    other = _trainer(corpus, tmp_path / "other")
    wrong = UnitVocoder(VocoderConfig.preset("tiny-istft-test").replace(num_units=7))
    save_vocoder(wrong, tmp_path / "wrong")
    with pytest.raises(ValueError, match="another config"):
        other.init_generator(tmp_path / "wrong")


def test_discriminator_periods_are_configurable_and_checked_on_resume(corpus, tmp_path):
    import typer

    from llama_omni.cli.vocoder import vocoder_train

    vocoder_train(corpus=corpus, units=corpus / "units.npz", run_dir=tmp_path / "run",
                  num_units=32, preset="tiny-istft-test", steps=1, batch_size=2,
                  segment_frames=8, disc_width=0.0625, disc_periods="2,3,16",
                  checkpoint_every=1, samples=0)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert tuple(VocoderTrainConfig.from_dict(state["config"]).disc_periods) == (2, 3, 16)
    assert {k.split(".")[1] for k in state["discriminators"] if k.startswith("period.")} == {"0", "1", "2"}

    default_periods = _trainer(corpus, tmp_path / "run")  # (2, 3, 5, 7, 11)
    with pytest.raises(ValueError, match="disc_periods"):
        default_periods.maybe_resume()
    for bad in ((), (1, 2), (3, 3)):
        with pytest.raises(ValueError, match="disc_periods"):
            VocoderTrainConfig(vocoder=VocoderConfig.preset("tiny-istft-test"), disc_periods=bad)
    with pytest.raises(typer.BadParameter, match="comma-separated"):
        vocoder_train(corpus=corpus, units=corpus / "units.npz", run_dir=tmp_path / "bad",
                      num_units=32, preset="tiny-istft-test", disc_periods="2;16", samples=0)


def test_loss_weights_are_validated_and_reach_the_trainer(corpus, tmp_path):
    from llama_omni.cli.vocoder import vocoder_train

    vocoder_train(corpus=corpus, units=corpus / "units.npz", run_dir=tmp_path / "run",
                  num_units=32, preset="tiny-istft-test", steps=1, batch_size=2,
                  segment_frames=8, disc_width=0.0625, mel_weight=15.0,
                  checkpoint_every=1, samples=0)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert VocoderTrainConfig.from_dict(state["config"]).mel_weight == 15.0
    for name, bad in (("mel_weight", -1.0), ("fm_weight", float("nan")), ("dur_weight", "1")):
        with pytest.raises(ValueError, match=name):
            VocoderTrainConfig(vocoder=VocoderConfig.preset("tiny-istft-test"), **{name: bad})


def test_a_warm_start_copies_only_the_matching_tensors(corpus, tmp_path):
    from llama_omni.model.vocoder import save_vocoder

    donor = UnitVocoder(VocoderConfig.preset("tiny-istft-test").replace(num_units=7))
    for p in donor.parameters():
        torch.nn.init.normal_(p, std=3.0)  # far from any fresh initialization
    save_vocoder(donor, tmp_path / "donor")
    trainer = _trainer(corpus, tmp_path / "run")
    fresh_dict = trainer.generator.dict.weight.detach().clone()
    copied = trainer.init_generator(tmp_path / "donor", matching_only=True)

    ours, theirs = trainer.generator.state_dict(), donor.state_dict()
    assert copied == len(ours) - 1  # all but the unit embedding, whose vocabulary differs
    assert torch.equal(ours["dict.weight"], fresh_dict)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n != "dict.weight")
