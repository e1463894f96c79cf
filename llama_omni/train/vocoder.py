"""Training of the unit vocoder (generator + duration predictor) against HiFi-GAN's
discriminators, with checkpoints that resume exactly.

Losses as in HiFi-GAN / fairseq's CodeHiFiGAN: generator = adversarial + 2 x feature
matching + 45 x mel L1; duration predictor = MSE between its log-duration and
log(1 + frames) of each merged unit. Before `gan_start_step` only the mel and duration
losses train (no discriminator runs): on a few CPU cores this buys intelligible output
several times sooner, and the adversarial phase then refines it. A checkpoint holds the models, both optimizers and
schedulers, the torch RNG and the step; batches are a function of (seed, step), so a run
killed and resumed from a checkpoint continues bit for bit as if never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama_omni.configbase import ConfigBase, require
from llama_omni.model.vocoder import (
    UnitVocoder,
    VocoderConfig,
    atomic_path,
    load_vocoder,
    save_vocoder,
)
from llama_omni.train.discriminators import (
    Discriminators,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    mel_loss,
)
from llama_omni.train.vocoder_data import Batch, VocoderData

CHECKPOINT_NAME = "last.pt"


@dataclass
class VocoderTrainConfig(ConfigBase):
    vocoder: VocoderConfig = field(default_factory=lambda: VocoderConfig.preset("istft-256"))
    disc_width: float = 0.25  # fraction of HiFi-GAN's discriminator channels
    # MPD periods; adding the iSTFT head's frame hop (16 samples) lets a discriminator see
    # the frame-rate pattern that otherwise needs the output notch filter
    disc_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    gan_start_step: int = 0  # steps of mel + duration loss only, before the discriminators
    steps: int = 20000
    batch_size: int = 8
    segment_frames: int = 24  # unit frames per training segment (24 x 20 ms = 0.48 s)
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.8, 0.99)
    lr_decay: float = 0.99998  # per step (HiFi-GAN: 0.999 per epoch)
    mel_weight: float = 45.0
    fm_weight: float = 2.0
    dur_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 25
    threads: int = 1  # on a shared CPU one thread per process beats two (no spin-waits)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.disc_periods = tuple(self.disc_periods)
        require(len(self.disc_periods) > 0 and len(set(self.disc_periods)) == len(self.disc_periods)
                and all(isinstance(p, int) and p > 1 for p in self.disc_periods),
                f"VocoderTrainConfig.disc_periods must be distinct integers > 1, "
                f"got {self.disc_periods!r}")
        for name in ("steps", "batch_size", "segment_frames", "checkpoint_every", "log_every",
                     "threads"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0,
                    f"VocoderTrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("mel_weight", "fm_weight", "dur_weight"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and value >= 0 and math.isfinite(value),
                    f"VocoderTrainConfig.{name} must be a finite number >= 0, got {value!r}")
        require(self.vocoder.has_duration_predictor,
                "VocoderTrainConfig: the vocoder needs a duration predictor")


class VocoderTrainer:
    """Holds the models, optimizers and schedulers of one run directory."""

    def __init__(self, config: VocoderTrainConfig, run_dir: str | Path, data: VocoderData,
                 export_dir: str | Path | None = None, samples: dict[str, np.ndarray] | None = None):
        self.config, self.data = config, data
        self.run_dir = Path(run_dir)
        self.export_dir = Path(export_dir) if export_dir else None
        self.samples = samples or {}  # name -> frame-level unit ids, vocoded at checkpoints
        torch.manual_seed(config.seed)
        self.generator = UnitVocoder(config.vocoder)
        self.discriminators = Discriminators(config.disc_width, config.disc_periods)
        adam = dict(lr=config.lr, betas=config.betas, foreach=True)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), **adam)
        self.opt_d = torch.optim.AdamW(self.discriminators.parameters(), **adam)
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, config.lr_decay)
        self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, config.lr_decay)
        self.step = 0

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        c = self.config
        self.generator.train()
        emb = self.generator.dict(batch.units).transpose(1, 2)  # [B, C, F]
        fake = self.generator.generate_from_embeddings(emb)  # [B, 1, F * hop]
        losses = dict(mel=mel_loss(batch.wave, fake), dur=self._duration_loss(batch))
        loss_g = c.mel_weight * losses["mel"] + c.dur_weight * losses["dur"]
        if self.step >= c.gan_start_step:
            losses |= self._adversarial_losses(batch.wave, fake)
            loss_g = loss_g + losses["adv"] + c.fm_weight * losses["fm"]
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.sched_g.step()
        self.step += 1
        return {k: v.item() for k, v in losses.items()}

    def _adversarial_losses(self, real: torch.Tensor,
                            fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update the discriminators, then return the generator's adversarial + FM losses.

        Feature matching takes its real-audio targets from the discriminators' pass before
        their update (HiFi-GAN runs them again after it): one pass fewer per step.
        """
        self.opt_d.zero_grad(set_to_none=True)
        real_out = self.discriminators(real)
        loss_d = discriminator_loss(real_out, self.discriminators(fake.detach()))
        loss_d.backward()
        self.opt_d.step()
        self.sched_d.step()  # the discriminators' schedule starts with their first update
        self.discriminators.requires_grad_(False)  # the generator's loss: no D weight grads
        fake_out = self.discriminators(fake)
        self.discriminators.requires_grad_(True)
        return dict(d=loss_d.detach(), adv=generator_adversarial_loss(fake_out),
                    fm=feature_matching_loss(real_out, fake_out))

    def _duration_loss(self, batch: Batch) -> torch.Tensor:
        mask = batch.dur_targets > 0  # [B, U]
        predicted = self.generator.dur_predictor(self.generator.dict(batch.dur_units))  # [B, U]
        target = torch.log1p(batch.dur_targets.float())
        return F.mse_loss(predicted[mask], target[mask])

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return dict(step=self.step, config=self.config.to_dict(),
                    generator=self.generator.state_dict(),
                    discriminators=self.discriminators.state_dict(),
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(),
                    sched_g=self.sched_g.state_dict(), sched_d=self.sched_d.state_dict(),
                    torch_rng=torch.get_rng_state())

    def save_checkpoint(self) -> Path:
        path = self.run_dir / CHECKPOINT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = VocoderTrainConfig.from_dict(state["config"])
        require(saved.vocoder == self.config.vocoder and saved.disc_width == self.config.disc_width
                and saved.disc_periods == self.config.disc_periods,
                f"{path} was trained with a different model config ({saved.vocoder}, "
                f"disc_width {saved.disc_width}, disc_periods {saved.disc_periods}); resume "
                f"with the same config or a new run dir")
        self.restore(state)

    def restore(self, state: dict) -> None:
        """Take back everything `state()` returned (models, optimizers, schedulers, RNG, step)."""
        self.generator.load_state_dict(state["generator"])
        self.discriminators.load_state_dict(state["discriminators"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def init_generator(self, path: str | Path, matching_only: bool = False) -> int:
        """Start a new run from a saved generator (`load_vocoder` formats): fine-tuning, or
        continuing a run whose checkpoint is gone. Discriminators and optimizers start fresh.

        `matching_only` warm-starts another config (e.g. a preset with one more upsampling
        stage): only the tensors whose names and shapes match are copied, the rest keep
        their random initialization. Returns how many tensors were copied."""
        require(self.step == 0, "init_generator: only a new run starts from a saved generator")
        saved = load_vocoder(path)
        ours = self.config.vocoder
        if matching_only:
            target = self.generator.state_dict()
            copied = {name: tensor for name, tensor in saved.state_dict().items()
                      if name in target and target[name].shape == tensor.shape}
            require(copied, f"{path}: no tensor matches this vocoder's names and shapes")
            self.generator.load_state_dict(copied, strict=False)
            return len(copied)
        require(saved.config.with_output_filter_of(ours) == ours,  # the filter has no weights
                f"{path} holds a vocoder of another config ({saved.config}); train with that "
                f"config (--preset / --num-units), warm-start with --init-matching, or start "
                f"from scratch")
        self.generator.load_state_dict(saved.state_dict())
        return len(saved.state_dict())

    def maybe_resume(self) -> bool:
        path = self.run_dir / CHECKPOINT_NAME
        if path.is_file():
            self.load_checkpoint(path)
            return True
        return False

    def on_checkpoint(self) -> None:
        """Checkpoint, export the generator (for shipping) and write sample wavs."""
        self.save_checkpoint()
        if self.export_dir is not None:
            save_vocoder(self.generator, self.export_dir)
        self.write_samples()

    @torch.no_grad()
    def write_samples(self) -> None:
        self.generator.eval()
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        rate = self.config.vocoder.sample_rate
        for name, frame_ids in self.samples.items():
            emb = self.generator.dict(torch.as_tensor(frame_ids)[None]).transpose(1, 2)
            wave = self.generator.generate_from_embeddings(emb)[0, 0].numpy()
            with atomic_path(out / f"{name}_step{self.step:07d}.wav") as tmp:
                sf.write(tmp, wave, rate, subtype="PCM_16", format="WAV")

    # -- loop ----------------------------------------------------------------------------------

    def train(self) -> None:
        c = self.config
        torch.set_num_threads(c.threads)
        log_path = self.run_dir / "log.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sums: dict[str, float] = {}
        started = time.monotonic()
        with tqdm(total=c.steps, initial=self.step, desc="vocoder", unit="step") as bar:
            while self.step < c.steps:
                batch = self.data.batch(c.seed, self.step, c.batch_size, c.segment_frames)
                for key, value in self.train_step(batch).items():
                    sums[key] = sums.get(key, 0.0) + value
                bar.update(1)
                if self.step % c.log_every == 0:
                    means = {k: round(v / c.log_every, 4) for k, v in sums.items()}
                    bar.set_postfix(means)
                    record = dict(step=self.step, lr=self.sched_g.get_last_lr()[0],
                                  elapsed_s=round(time.monotonic() - started, 1), **means)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    sums = {}
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.on_checkpoint()


def estimate_steps_per_second(trainer: VocoderTrainer, steps: int = 3) -> float:
    """Time a few steps (after one warm-up) without keeping their updates."""
    state = copy.deepcopy(trainer.state())
    c = trainer.config
    trainer.train_step(trainer.data.batch(c.seed, 0, c.batch_size, c.segment_frames))
    start = time.monotonic()
    for i in range(steps):
        trainer.train_step(trainer.data.batch(c.seed, i + 1, c.batch_size, c.segment_frames))
    rate = steps / (time.monotonic() - start)
    trainer.restore(state)
    return rate if math.isfinite(rate) else 0.0
