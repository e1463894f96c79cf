"""The data build config (YAML): source, filters, LLM, and one section per step.

Relative paths in the file (out, source.path, prompts, units.model) are taken relative to
the current directory, like the paths given on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llama_omni.configbase import ConfigBase, require
from llama_omni.data.filters import FilterConfig
from llama_omni.data.llm_backends import BackendConfig
from llama_omni.data.respond import RespondConfig
from llama_omni.data.rewrite import RewriteConfig
from llama_omni.data.sources import SourceConfig
from llama_omni.data.tts import ESPEAK_VOICES, FLITE_VOICES, split_voice

STEPS = ("rewrite", "respond", "synthesize", "units")
DEFAULT_INSTRUCTION_VOICES = (
    ("piper:joe",) + tuple(f"flite:{v}" for v in FLITE_VOICES)
    + tuple(f"espeak-ng:{v}" for v in ESPEAK_VOICES)
)


@dataclass
class SynthesizeConfig(ConfigBase):
    """Instruction voices are picked per item (seeded); every response gets response_voice.

    backend_options: constructor arguments per backend, e.g. {"piper": {"models": {"amy":
    "/path/amy.onnx"}}, "command": {"command": "mytts --out {out} {text}"}}.
    max_instruction_seconds: longer instruction audio fails the item (the speech encoder
    reads at most 30 s).
    """

    instruction_voices: tuple[str, ...] = DEFAULT_INSTRUCTION_VOICES
    response_voice: str = "hibari:heart"
    backend_options: dict = field(default_factory=dict)
    workers: int = 2
    max_instruction_seconds: float = 30.0

    def __post_init__(self) -> None:
        self.instruction_voices = tuple(self.instruction_voices)
        require(bool(self.instruction_voices), "synthesize.instruction_voices is empty")
        for spec in self.instruction_voices + (self.response_voice,):
            split_voice(spec)
        require(self.workers >= 1, "synthesize.workers must be >= 1")


@dataclass
class UnitsStepConfig(ConfigBase):
    """model: a units model directory (units.json + kmeans.safetensors); None = the shipped one."""

    model: str | None = None
    threads: int = 1


@dataclass
class DataConfig(ConfigBase):
    """batch_size: items per unit of work (and per state-log write); executor: "local" or "ray".

    wave: run all steps on this many items at a time (None: each step on every item before
    the next step), so a long build has a complete, growing data set after each wave.
    """

    out: str
    seed: int = 0
    source: SourceConfig = field(default_factory=SourceConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    llm: BackendConfig = field(default_factory=BackendConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    units: UnitsStepConfig = field(default_factory=UnitsStepConfig)
    batch_size: int = 32
    wave: int | None = None
    executor: str = "local"

    def __post_init__(self) -> None:
        require(bool(self.out), "out (the data set directory) is required")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.wave is None or self.wave >= 1, "wave must be >= 1 (or null)")
        require(self.executor in ("local", "ray"), f"executor {self.executor!r}: 'local' or 'ray'")

    @classmethod
    def load(cls, path: str | Path) -> DataConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
