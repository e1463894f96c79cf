"""The training loop, on Hugging Face accelerate (one CPU core to many GPUs and nodes).

AdamW, cosine schedule after a linear warmup, gradient accumulation up to the effective
batch, gradient clipping, periodic logging (loss, learning rate, tokens per second) to
`metrics.jsonl` and TensorBoard, held-out evaluation, checkpoints, and exact resume.

Exact resume rests on three things: batches come in an order fixed by (seed, epoch);
the random generators are re-seeded from (seed, epoch, batch) before every micro-batch,
so dropout does not depend on what ran before; and checkpoints are taken only between
optimizer steps. A resumed run therefore repeats the uninterrupted run's computation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from llama_omni.train import checkpoints
from llama_omni.train.batches import EpochBatches
from llama_omni.train.config import TrainConfig

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


@dataclass
class StageData:
    """What a stage hands the trainer: a module whose forward(batch) returns
    (summed loss, count) and the datasets with their collate function."""

    module: nn.Module
    train: Dataset
    eval: Dataset | None
    collate: Callable


def accumulation_steps(config: TrainConfig, num_processes: int) -> int:
    per_step = config.micro_batch_size * num_processes
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of micro_batch_size x processes "
            f"= {config.micro_batch_size} x {num_processes}; change batch_size or micro_batch_size"
        )
    return config.batch_size // per_step


class Trainer:
    def __init__(self, config: TrainConfig, accelerator: Accelerator, stage: StageData):
        self.config = config
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)
        self.progress = checkpoints.Progress()
        if not len(stage.train):
            raise ValueError("no training examples (after the data.max_length filter)")
        lengths = stage.train.lengths if config.data.group_by_length else None
        self.sampler = EpochBatches(len(stage.train), config.micro_batch_size, config.seed, lengths)
        workers = dict(collate_fn=stage.collate, num_workers=config.data.num_workers)
        train_loader = DataLoader(stage.train, batch_sampler=self.sampler, **workers)
        eval_loader = (
            DataLoader(stage.eval, batch_size=config.micro_batch_size, **workers)
            if stage.eval is not None and len(stage.eval) else None
        )
        accum = accelerator.gradient_accumulation_steps
        batches = math.ceil(len(self.sampler) / accelerator.num_processes)
        self.steps_per_epoch = math.ceil(batches / accum)
        self.total_steps = min(
            config.max_steps or math.inf, self.steps_per_epoch * config.epochs
        )
        trainable = [p for p in stage.module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("nothing to train: no parameter of the stage module requires grad")
        optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, betas=config.optim.betas, eps=config.optim.eps,
            weight_decay=config.optim.weight_decay,
        )
        warmup = math.ceil(config.optim.warmup_ratio * self.total_steps)
        scheduler = cosine_with_warmup(optimizer, warmup, self.total_steps)
        self.module, self.optimizer, self.train_loader, self.scheduler = accelerator.prepare(
            stage.module, optimizer, train_loader, scheduler
        )
        self.eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
        accelerator.register_for_checkpointing(self.progress)
        if accelerator.distributed_type.value not in ("DEEPSPEED", "FSDP"):
            checkpoints.store_trainable_only(accelerator)
        self.trainable_count = sum(p.numel() for p in trainable)
        self.saved_step: int | None = None

    # -- public ---------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Load the latest complete checkpoint of output_dir, if any."""
        checkpoints.remove_partial(self.output_dir)
        latest = checkpoints.latest_checkpoint(self.output_dir)
        if latest is None:
            return None
        if not self.config.resume:
            raise ValueError(
                f"{self.output_dir} already holds checkpoints (latest {latest.name}); set "
                "resume=true to continue that run, or choose a new output_dir"
            )
        self.accelerator.load_state(str(latest))
        self.saved_step = self.progress.step
        self.log_event({"event": "resume", "checkpoint": latest.name, **self.progress.state_dict()})
        return latest

    def fit(self) -> None:
        cfg, acc = self.config, self.accelerator
        self.log_event({
            "event": "start", "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "accumulation": acc.gradient_accumulation_steps, "processes": acc.num_processes,
            "trainable_parameters": self.trainable_count, "lr": cfg.lr,
        })
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc=cfg.stage,
                   unit="step", disable=not acc.is_main_process)
        if self.progress.step == 0:
            self._log_eval(0)  # the "before" of the held-out loss
        window = _Window()
        self.module.train()
        while self.progress.step < self.total_steps:
            for batch in self._epoch_batches():
                self.progress.batches += 1
                set_seed(_batch_seed(cfg.seed, self.progress.epoch, self.progress.batches),
                         device_specific=True)
                with acc.accumulate(self.module):
                    loss_sum, count = self.module(batch)
                    acc.backward(loss_sum / count.clamp(min=1))
                    window.add(loss_sum.detach(), count, batch.positions)
                    if acc.sync_gradients and cfg.optim.grad_clip > 0:
                        acc.clip_grad_norm_(self.module.parameters(), cfg.optim.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.progress.step += 1
                bar.update(1)
                self._after_step(window, bar)
                if self.progress.step >= self.total_steps:
                    break
            else:
                self.progress.epoch += 1
                self.progress.batches = 0
        bar.close()
        if self.saved_step != self.progress.step:
            self._save()
        self.log_event({"event": "end", "step": self.progress.step})

    def evaluate(self) -> float | None:
        """Held-out loss per supervised token (or unit), over all processes."""
        if self.eval_loader is None:
            return None
        self.module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        with torch.no_grad():
            for batch in self.eval_loader:
                loss_sum, count = self.module(batch)
                total += torch.stack([loss_sum.double(), count.double()])
        self.module.train()
        total = self.accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp(min=1))

    # -- internals ------------------------------------------------------------------------
    def _epoch_batches(self):
        self.sampler.epoch = self.progress.epoch
        if self.progress.batches:
            return self.accelerator.skip_first_batches(self.train_loader, self.progress.batches)
        return self.train_loader

    def _after_step(self, window: _Window, bar: tqdm) -> None:
        cfg, step = self.config, self.progress.step
        if _is_multiple(step, cfg.log_every) or step == self.total_steps:
            loss, per_second = window.flush(self.accelerator)
            lr = self.scheduler.get_last_lr()[0]
            self._log({"step": step, "epoch": self.progress.epoch, "loss": loss, "lr": lr,
                       "tokens_per_second": per_second})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if _is_multiple(step, cfg.eval_every) or step == self.total_steps:
            self._log_eval(step)
        if _is_multiple(step, cfg.save_every):
            self._save()

    def _log_eval(self, step: int) -> None:
        eval_loss = self.evaluate()
        if eval_loss is not None:
            self._log({"step": step, "eval_loss": eval_loss})

    def _save(self) -> None:
        step = self.progress.step
        checkpoints.save(self.accelerator, self.output_dir, step, self.config.keep_checkpoints)
        self.saved_step = step

    def _log(self, metrics: dict) -> None:
        values = {k: v for k, v in metrics.items() if k not in ("step", "epoch")}
        self.accelerator.log(values, step=metrics["step"])
        self.log_event(metrics)

    def log_event(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if "loss" in record or "eval_loss" in record or "event" in record:
            log.info("%s", record)


class _Window:
    """Loss and throughput since the last log line (token-weighted over all processes)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.totals = torch.zeros(3, dtype=torch.float64)  # loss sum, count, positions

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor, positions: int) -> None:
        self.totals += torch.tensor([float(loss_sum), float(count), float(positions)],
                                    dtype=torch.float64)

    def flush(self, accelerator: Accelerator) -> tuple[float, float]:
        totals = accelerator.reduce(self.totals.to(accelerator.device), reduction="sum").cpu()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.start, self.totals = time.perf_counter(), torch.zeros(3, dtype=torch.float64)
        return float(totals[0] / totals[1].clamp(min=1)), float(totals[2] / elapsed)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warmup from 0 to the peak over `warmup` steps, then a half cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def _is_multiple(step: int, every: int) -> bool:
    return step > 0 and step % every == 0


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{batch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")
