"""The four pipeline steps as processors: a batch of item views in, one record per item out.

A view is the selected item ({"id", "source", "text", "response"}) plus, under each earlier
step's name, that step's record. A record is {"id", "ok", ...results} or {"id", "ok":
false, "reason", "error"?}; "seconds" is the item's share of the processing time. Steps
write their files atomically before returning, so a logged record always has its files.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from llama_omni.data.config import DataConfig
from llama_omni.data.llm_backends import ChatBackend, make_backend
from llama_omni.data.manifest import atomic_write_bytes
from llama_omni.data.respond import LLMResponder
from llama_omni.data.rewrite import LLMRewriter, RuleRewriter
from llama_omni.data.sources import Instruction
from llama_omni.data.tts import SAMPLE_RATE, TTSError, VoicePool, encode_flac


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished child processes (flite, espeak-ng)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Step(ABC):
    name: str
    requires: tuple[str, ...] = ()
    parallel = False  # whether several worker processes may run it side by side

    def __init__(self, config: DataConfig, root: Path, tag: str = "",
                 llm: Callable[[], ChatBackend] | None = None):
        self.config, self.root, self.tag = config, root, tag
        self._llm = llm or (lambda: make_backend(config.llm, config.seed))

    def ready(self) -> str | None:
        """Why this step cannot run on this machine (shown, and the step skipped), or None."""
        return None

    @abstractmethod
    def _process(self, views: list[dict]) -> list[dict]:
        """Records without "id" and "seconds", in the order of `views`."""

    def process(self, views: list[dict]) -> list[dict]:
        """Records with the item's share of the wall time ("seconds") and of the CPU time of
        this process and its helper programs ("cpu_seconds": comparable across loads)."""
        start, cpu = time.perf_counter(), _cpu_time()
        records = self._process(views)
        n = max(1, len(views))
        share = round((time.perf_counter() - start) / n, 4)
        cpu_share = round((_cpu_time() - cpu) / n, 4)
        return [{"id": v["id"], **r, "seconds": share, "cpu_seconds": cpu_share}
                for v, r in zip(views, records)]


class RewriteStep(Step):
    name = "rewrite"

    @cached_property
    def _rules(self) -> RuleRewriter:
        return RuleRewriter(self.config.seed, self.config.rewrite.filler_prob)

    @cached_property
    def _rewriter(self) -> LLMRewriter:
        return LLMRewriter(self._llm(), self.config.rewrite, self._rules,
                           self.config.llm.temperature)

    def _process(self, views: list[dict]) -> list[dict]:
        if self.config.rewrite.method == "rules":
            return [{"ok": True, "text": self._rules(v["id"], v["text"]), "method": "rules"}
                    for v in views]
        items = [Instruction(v["id"], v["source"], v["text"]) for v in views]
        return [{"ok": True, **r} for r in self._rewriter(items)]


class RespondStep(Step):
    name = "respond"

    @property
    def requires(self) -> tuple[str, ...]:
        return ("rewrite",) if self.config.respond.input == "rewritten" else ()

    @cached_property
    def _responder(self) -> LLMResponder:
        return LLMResponder(self._llm(), self.config.respond, self.config.llm.temperature)

    def _process(self, views: list[dict]) -> list[dict]:
        rewritten = self.config.respond.input == "rewritten"
        return self._responder([v["rewrite"]["text"] if rewritten else v["text"] for v in views])


class SynthesizeStep(Step):
    """Instruction audio in a seeded per-item voice, response audio in the fixed voice."""

    name = "synthesize"
    requires = ("rewrite", "respond")
    parallel = True

    @cached_property
    def _voices(self) -> VoicePool:
        cfg = self.config.synthesize
        return VoicePool(list(cfg.instruction_voices), self.config.seed, cfg.backend_options)

    def ready(self) -> str | None:
        missing = self._voices.missing()
        response = VoicePool([self.config.synthesize.response_voice], 0,
                             self.config.synthesize.backend_options).missing()
        if missing or response:
            return (f"voices not available here: {missing + response} (install their backends, "
                    "or remove them from synthesize.instruction_voices / response_voice)")
        return None

    def _process(self, views: list[dict]) -> list[dict]:
        return [self._one(v) for v in views]

    def _one(self, view: dict) -> dict:
        cfg, item_id = self.config.synthesize, view["id"]
        voice = self._voices.pick(item_id)
        try:
            instruction = self._voices.synthesize(voice, view["rewrite"]["text"])
            if len(instruction) > cfg.max_instruction_seconds * SAMPLE_RATE:
                return {"ok": False, "reason": "instruction_audio_too_long", "voice": voice}
            response = self._voices.synthesize(cfg.response_voice, view["respond"]["text"])
        except TTSError as err:
            return {"ok": False, "reason": "tts_error", "error": str(err)[:300], "voice": voice}
        paths = {"instruction": f"audio/instruction/{item_id}.flac",
                 "response": f"audio/response/{item_id}.flac"}
        atomic_write_bytes(self.root / paths["instruction"], encode_flac(instruction), self.tag)
        atomic_write_bytes(self.root / paths["response"], encode_flac(response), self.tag)
        return {"ok": True, "voice": voice, "response_voice": cfg.response_voice,
                "instruction_audio": paths["instruction"], "response_audio": paths["response"],
                "instruction_seconds": round(len(instruction) / SAMPLE_RATE, 3),
                "response_seconds": round(len(response) / SAMPLE_RATE, 3)}


class UnitsStep(Step):
    """Units of the response speech (merged repeats), from the units issue's extractor."""

    name = "units"
    requires = ("synthesize",)

    @property
    def model_dir(self) -> Path:
        if self.config.units.model:
            return Path(self.config.units.model)
        from llama_omni.units.extract import DEFAULT_UNITS_DIR

        return DEFAULT_UNITS_DIR

    def ready(self) -> str | None:
        try:
            from llama_omni.units.extract import CONFIG_NAME
        except ImportError:
            return "the units package (llama_omni.units) is not available in this install"
        if not (self.model_dir / CONFIG_NAME).is_file():
            return (f"no units model at {self.model_dir} yet: train one with `llama-omni units "
                    "train`, or set units.model in the config; the manifest is written without "
                    "units")
        return None

    @cached_property
    def _extractor(self):
        import torch

        from llama_omni.units.extract import UnitExtractor

        torch.set_num_threads(self.config.units.threads)
        return UnitExtractor.load(self.model_dir)

    def _process(self, views: list[dict]) -> list[dict]:
        from llama_omni.audio import load_audio

        records = []
        for view in views:
            audio = load_audio(self.root / view["synthesize"]["response_audio"])
            units, _ = self._extractor(audio)
            records.append({"ok": True, "units": [int(u) for u in units],
                            "units_model": self.model_dir.name})
        return records


STEP_CLASSES: dict[str, type[Step]] = {
    s.name: s for s in (RewriteStep, RespondStep, SynthesizeStep, UnitsStep)}
