"""The evaluation run: every item through every system and task, resumable.

Systems: "llama-omni" (the model through the streaming engine) and, optionally, the
"cascade" baseline. Per item and system the stages are:
    s2t          text-only decoding of the spoken question (S2TIF; decode time without speech)
    gold         the same LLM answering the written question (for answer fidelity)
    s2s_<Omega>  text + speech at chunk size Omega: latency, lagging words, the speech
                 answer's ASR transcript, WER/CER against the text answer, DNSMOS, UTMOS
    judge        content/style of the s2t text and of the reference Omega's transcript
    fidelity     MiniLM cosine between the s2t answer and the gold answer
Each stage's result is written to out/items/<system>/<id>.json as soon as it exists
(atomically), so an interrupted run resumes where it stopped. out/run.json records the
settings that make results comparable; resuming with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from llama_omni.audio import AudioError
from llama_omni.configbase import ConfigBase, require
from llama_omni.data.tts import TTSError
from llama_omni.eval.cascade import RESPONSE_VOICE, Cascade, text_request
from llama_omni.eval.judge import Judge
from llama_omni.eval.metrics import ASR, UTMOS, SentenceEmbedder, StreamTimes, dnsmos
from llama_omni.eval.sets import EVAL_VOICES, EvalItem, speak
from llama_omni.eval.wer import error_counts
from llama_omni.inference.engine import Engine, EngineOptions
from llama_omni.inference.events import Answer, Event, collect
from llama_omni.inference.sampling import SamplingOptions
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder, atomic_path

MODEL, CASCADE = "llama-omni", "cascade"
TASKS = ("s2t", "s2s")
JUDGE_BATCH = 16


def omega_name(omega: int | None) -> str:
    return "inf" if omega is None else str(omega)


@dataclass
class EvalOptions:
    """What to run. chunk_sizes: the Omegas of the s2s task (None = inf).

    cascade_voice: the baseline's TTS voice; judge_url None: no judge scores.
    """

    tasks: tuple[str, ...] = TASKS
    chunk_sizes: tuple[int | None, ...] = (10, 40, None)
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0  # answers of the model and the cascade's LLM alike
    baseline: bool = False
    voices: tuple[str, ...] = EVAL_VOICES
    cascade_voice: str = RESPONSE_VOICE
    judge_url: str | None = None
    judge_model: str = "judge"
    asr_model: str | None = None
    threads: int = 1
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        require(bool(self.tasks) and set(self.tasks) <= set(TASKS),
                f"tasks {self.tasks}: choose from {TASKS}")
        require("s2s" not in self.tasks or bool(self.chunk_sizes),
                "the s2s task needs at least one chunk size")
        require(all(o is None or o >= 1 for o in self.chunk_sizes),
                f"chunk sizes must be >= 1 or inf, got {self.chunk_sizes}")
        require(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        self.sampling()  # validates repetition_penalty

    def sampling(self) -> SamplingOptions:
        """Greedy decoding (the paper's), with the repetition penalty if one is set."""
        return SamplingOptions(repetition_penalty=self.repetition_penalty)

    @property
    def reference_omega(self) -> int | None:
        """The Omega whose speech answers Tables 1 and 2 report: inf when run, else the largest."""
        if None in self.chunk_sizes or not self.chunk_sizes:
            return None
        return max(self.chunk_sizes)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change per-item results: a cache made with others is not reused."""
        return {"max_new_tokens": self.max_new_tokens, "voices": list(self.voices),
                "repetition_penalty": self.repetition_penalty,
                "cascade_voice": self.cascade_voice, "asr_model": self.asr_model,
                "seed": self.seed, "judge_model": self.judge_model}


@dataclass
class ItemStore:
    """Per-item results as JSON files under `root`/<system>/<id>.json, written atomically."""

    root: Path
    records: dict[tuple[str, str], dict] = field(default_factory=dict)

    def get(self, system: str, item_id: str) -> dict:
        key = (system, item_id)
        if key not in self.records:
            path = self.root / system / f"{item_id}.json"
            self.records[key] = json.loads(path.read_text()) if path.is_file() else {"id": item_id}
        return self.records[key]

    def save(self, system: str, item_id: str) -> None:
        path = self.root / system / f"{item_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.records[(system, item_id)], indent=1))


class Evaluator:
    """Runs `items` for the model (and the cascade) into `out_dir`; see the module doc."""

    def __init__(self, model: OmniModel, vocoder: UnitVocoder | None, options: EvalOptions,
                 out_dir: str | Path, run_info: dict[str, Any],
                 cascade_llm: OmniModel | None = None):
        """cascade_llm: a model whose LLM the cascade uses (see `with_llm`); None: the
        model's own LLM, whose gold answers then serve both systems."""
        self.model, self.vocoder, self.options = model, vocoder, options
        self.out = Path(out_dir)
        self.run_info = {**run_info, "weights": weights_fingerprint(model, vocoder, cascade_llm),
                         "settings": options.fingerprint()}
        self.store = ItemStore(self.out / "items")
        self.asr = ASR(options.asr_model, device=options.device, threads=options.threads)
        self.utmos = UTMOS()
        self.embedder = SentenceEmbedder(options.device)
        self.judge = Judge(options.judge_url, options.judge_model) if options.judge_url else None
        self.cascade, self.shared_llm = None, cascade_llm is None
        if options.baseline:
            engine = Engine(cascade_llm or model, None, self._engine_options(speech=False))
            self.cascade = Cascade(engine, self.asr, options.cascade_voice)
        require("s2s" not in options.tasks or vocoder is not None,
                "the s2s task needs a vocoder for the model's units (pass --vocoder DIR)")

    @property
    def systems(self) -> list[str]:
        return [MODEL] + ([CASCADE] if self.cascade else [])

    def run(self, items: list[EvalItem]) -> dict[str, list[dict]]:
        """Every stage of every item; returns {system: [record per item]}."""
        self._check_run_info()
        inputs = speak(items, self.out / "inputs", self.options.voices, self.options.seed)
        warm = False
        for item, audio in tqdm(inputs, total=len(items), desc="eval", unit="item"):
            if not warm and self._incomplete(item):
                self._warm_up(audio)
                warm = True
            for system in self.systems:
                record = self.store.get(system, item.id)
                record.update(instruction=item.instruction, voice=item.voice)
                self._generate(system, item, audio, record)
        self._fidelity(items)
        if self.judge is not None:
            self._judge(items)
        return {s: [self.store.get(s, i.id) for i in items] for s in self.systems}

    # -- generation ----------------------------------------------------------------------
    def _incomplete(self, item: EvalItem) -> bool:
        stages = ["s2t", "gold"] + [f"s2s_{omega_name(o)}" for o in self._omegas()]
        return any(s not in self.store.get(MODEL, item.id) for s in stages) or (
            self.cascade is not None and "s2t" not in self.store.get(CASCADE, item.id))

    def _warm_up(self, audio: np.ndarray) -> None:
        """Load every model and run each path once, untimed: the first timed item must not
        pay for loading (ASR, TTS, scorers) or for first-call kernel set-up."""
        short = EngineOptions(max_new_tokens=4, speech=False)
        _answer(Engine(self.model, None, short).stream([audio]))
        if self.vocoder is not None and self._omegas():
            speech = EngineOptions(max_new_tokens=4, chunk_size=min(self._omegas(), key=_finite))
            _answer(Engine(self.model, self.vocoder, speech).stream([audio]))
        if self.cascade is not None:
            self.cascade.voices.synthesize(self.cascade.voice, "Hello there.")
        self.asr(audio)
        dnsmos(audio)

    def _generate(self, system: str, item: EvalItem, audio: np.ndarray, record: dict) -> None:
        stages: dict[str, Callable[[], dict]] = {}
        if system == MODEL:
            stages["s2t"] = lambda: self._model_text(audio)
            stages["gold"] = lambda: self._gold(self.model_engine_text, item)
            for omega in self._omegas():
                stages[f"s2s_{omega_name(omega)}"] = lambda o=omega: self._model_speech(item, audio, o)
        else:
            stages["s2t"] = lambda: self._cascade(item, audio, speech=False)
            if self.shared_llm:
                stages["gold"] = lambda: self.store.get(MODEL, item.id)["gold"]
            else:
                stages["gold"] = lambda: self._gold(self.cascade.engine, item)
            if "s2s" in self.options.tasks:
                stages["s2s_cascade"] = lambda: self._cascade(item, audio, speech=True)
        for name, stage in stages.items():
            if name in record:
                continue
            record["load_average"] = os.getloadavg()[0]  # timings depend on the machine's load
            try:
                record[name] = stage()
            except (AudioError, TTSError) as err:  # this input cannot be run: say so, go on
                record[name] = {"error": f"{type(err).__name__}: {err}"}
            self.store.save(system, item.id)

    def _omegas(self) -> list[int | None]:
        return list(self.options.chunk_sizes) if "s2s" in self.options.tasks else []

    def _engine_options(self, speech: bool, omega: int | None = None) -> EngineOptions:
        return EngineOptions(max_new_tokens=self.options.max_new_tokens, speech=speech,
                             chunk_size=omega, sampling=self.options.sampling())

    def _engine(self, speech: bool, omega: int | None = None) -> Engine:
        return Engine(self.model, self.vocoder if speech else None,
                      self._engine_options(speech, omega))

    @property
    def model_engine_text(self) -> Engine:
        return self._engine(speech=False)

    def _model_text(self, audio: np.ndarray) -> dict:
        answer = _answer(self.model_engine_text.stream([audio]))
        return {"text": answer.text, "end_reason": answer.end_reason,
                **asdict(StreamTimes.of(answer))}

    def _gold(self, engine: Engine, item: EvalItem) -> dict:
        answer = _answer(engine.stream([text_request(engine, item.instruction)]))
        return {"text": answer.text, "end_reason": answer.end_reason}

    def _model_speech(self, item: EvalItem, audio: np.ndarray, omega: int | None) -> dict:
        answer = _answer(self._engine(speech=True, omega=omega).stream([audio]))
        return self._speech_scores(answer, MODEL, omega_name(omega), item.id)

    def _cascade(self, item: EvalItem, audio: np.ndarray, speech: bool) -> dict:
        transcript, events = self.cascade.stream(audio, speech=speech)
        answer = _answer(events)
        if speech:
            return {"transcript": transcript, **self._speech_scores(answer, CASCADE, "cascade", item.id)}
        return {"transcript": transcript, "text": answer.text, "end_reason": answer.end_reason,
                **asdict(StreamTimes.of(answer))}

    def _speech_scores(self, answer: Answer, system: str, run: str, item_id: str) -> dict:
        """Write the speech answer and score it against its own text."""
        path = self.out / "audio" / system / run / f"{item_id}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            sf.write(tmp, answer.audio, answer.sample_rate, subtype="PCM_16", format="WAV")
        transcript = self.asr(answer.audio)
        counts = error_counts(answer.text, transcript)
        return {
            "text": answer.text, "asr": transcript, "end_reason": answer.end_reason,
            "errors": asdict(counts) if counts else None,
            "dnsmos": dnsmos(answer.audio), "utmos": self.utmos(answer.audio),
            "audio": str(path.relative_to(self.out)), "audio_seconds": answer.audio_seconds,
            **asdict(StreamTimes.of(answer)),
        }

    # -- scores over all items -------------------------------------------------------------
    def _fidelity(self, items: list[EvalItem]) -> None:
        for system in self.systems:
            todo = [r for r in (self.store.get(system, i.id) for i in items)
                    if "fidelity" not in r and _text(r, "s2t") is not None
                    and _text(r, "gold") is not None]
            if not todo:
                continue
            scores = self.embedder.similarity([_text(r, "s2t") for r in todo],
                                              [_text(r, "gold") for r in todo])
            for record, score in zip(todo, scores):
                record["fidelity"] = score
                self.store.save(system, record["id"])

    def _judge(self, items: list[EvalItem]) -> None:
        """Content/style of each system's text answer (S2TIF) and of its speech answer's
        transcript at the reference Omega (S2SIF), in batches."""
        s2s_run = {MODEL: f"s2s_{omega_name(self.options.reference_omega)}", CASCADE: "s2s_cascade"}
        todo: list[tuple[str, dict, str, str]] = []  # (system, record, task, answer)
        for system in self.systems:
            for item in items:
                record = self.store.get(system, item.id)
                done = record.setdefault("judge", {})
                for task, stage, key in (("s2t", "s2t", "text"), ("s2s", s2s_run[system], "asr")):
                    answer = record.get(stage, {}).get(key)
                    if task in self.options.tasks and task not in done and answer is not None:
                        todo.append((system, record, task, answer))
        bar = tqdm(total=len(todo), desc="judge", unit="answer")
        for start in range(0, len(todo), JUDGE_BATCH):
            batch = todo[start:start + JUDGE_BATCH]
            scores = self.judge.score([(r["instruction"], answer) for _, r, _, answer in batch])
            for (system, record, task, _), score in zip(batch, scores):
                record["judge"][task] = score
                self.store.save(system, record["id"])
            bar.update(len(batch))
        bar.close()

    def _check_run_info(self) -> None:
        path = self.out / "run.json"
        if path.is_file():
            before = json.loads(path.read_text())
            changed = sorted(k for k in ("model", "weights", "set", "settings")
                             if before.get(k) != self.run_info.get(k))
            if changed:
                raise ValueError(f"{self.out} holds results made with other {', '.join(changed)} "
                                 f"({before.get('model')!r}); use another --out or delete it")
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.run_info, indent=2))


def weights_fingerprint(*modules: torch.nn.Module | None) -> str:
    """sha256 over the modules' parameter names and bytes and their (and their children's)
    typed configs: a checkpoint rebuilt in place (same path, new weights) or with a new
    decoding setting in its config (e.g. the speech decoder's blank_penalty, the vocoder's
    output filters) must not reuse the per-item results of the old one."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for sub in module.modules():
            config = getattr(sub, "config", None)
            if isinstance(config, ConfigBase):
                digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _answer(events: Iterable[Event]) -> Answer:
    (answer,) = collect(events, 1)
    return answer


def _finite(omega: int | None) -> float:
    return float("inf") if omega is None else omega


def _text(record: dict, stage: str) -> str | None:
    return record.get(stage, {}).get("text")


def with_llm(model: OmniModel, source: str) -> OmniModel:
    """`model` with another LLM (e.g. the untuned backbone, for the cascade); the other
    parts are shared, not copied."""
    from llama_omni.model.llm import SpeechLLM

    config = model.config.replace(llm=model.config.llm.replace(source=source))
    llm = SpeechLLM.load(config.llm, device=model.device, dtype=model.dtype)
    return OmniModel(config, model.encoder, llm, model.adaptor, model.speech_decoder).eval()


def set_threads(threads: int) -> None:
    """CPU threads of torch (the ASR gets its own through ASR(threads=...))."""
    import torch

    torch.set_num_threads(threads)
