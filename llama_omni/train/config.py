"""Typed training configs: YAML files plus dotted command-line overrides.

A run is described by one `TrainConfig`. It is read from YAML, then `--set a.b=value`
overrides are applied to the raw mapping (values parsed as YAML scalars, so `1e-4`,
`true`, `null` and `[1, 2]` work), and only then is it validated, so a value from the
command line is checked exactly like one from the file. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llama_omni.configbase import ConfigBase, require

STAGES = ("align", "stage1", "stage2")  # align: optional adaptor pre-alignment (align.py)
TUNINGS = ("full", "lora", "adaptor")  # stage 1: what of the LLM side trains
PRECISIONS = ("fp32", "bf16")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_LR = {"align": 1e-3, "stage1": 2e-5, "stage2": 2e-4}  # stage 1 and 2: the paper's


@dataclass
class ModelSpec(ConfigBase):
    """Where the model to train comes from: a preset (fresh adaptor and decoder) or a checkpoint.

    overrides: nested OmniConfig fields merged into the preset, e.g.
    {"speech_decoder": {"unit_vocab": 500}, "encoder_source": "/models/large-v3.pt"}.
    With a checkpoint only `speech_decoder` may be overridden: a change that keeps the
    weights' shapes (e.g. attention_window) keeps the trained decoder, any other (e.g. a
    unit vocabulary other than the checkpoint's) starts a fresh one.
    base_dir: directory holding `llm/` for presets whose LLM source is "embedded".
    dtype: the weights' dtype (bf16 weights for 8B models under DeepSpeed).
    """

    preset: str | None = "small"
    checkpoint: str | None = None
    base_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(
            (self.preset is None) != (self.checkpoint is None),
            "model: give exactly one of model.preset and model.checkpoint "
            "(set the other to null, e.g. --set model.preset=null)",
        )
        require(self.dtype in DTYPES, f"model.dtype {self.dtype!r}: choose one of {DTYPES}")
        if self.checkpoint is not None:
            require(
                set(self.overrides) <= {"speech_decoder"},
                "model.overrides with a checkpoint may only hold speech_decoder (a fresh "
                f"decoder); got {sorted(self.overrides)}",
            )


@dataclass
class DataSpec(ConfigBase):
    """Training data: a manifest directory (manifest.jsonl) or a published-format JSON list.

    eval: a held-out manifest; without one, `eval_fraction` of the items (chosen by a hash
    of their id, so the split never changes) is held out, at most `eval_max_items`.
    cache_dir: encoder features and stage-2 LLM states, shared between runs (keyed by
    content, so one cache can serve any number of runs and models).
    """

    train: str = ""
    eval: str | None = None
    eval_fraction: float = 0.02
    eval_max_items: int = 200
    audio_root: str | None = None  # published format: audio paths resolve against this
    max_items: int | None = None
    max_length: int = 2048  # items longer than this (text tokens + speech positions) are skipped
    cache_dir: str = "runs/cache"
    cache_dtype: str = "float32"
    encode_batch_size: int = 8
    num_workers: int = 0
    # Micro-batches of similar lengths (still in random order): less padding, faster steps.
    group_by_length: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(bool(self.train), "data.train is empty: give a manifest directory or JSON file")
        require(0 <= self.eval_fraction < 1, "data.eval_fraction must lie in [0, 1)")
        require(self.cache_dtype in DTYPES, f"data.cache_dtype: choose one of {DTYPES}")
        for name in ("eval_max_items", "max_length", "encode_batch_size"):
            require(getattr(self, name) > 0, f"data.{name} must be positive")
        require(self.max_items is None or self.max_items > 0, "data.max_items must be positive")
        require(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass
class LoraSpec(ConfigBase):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.r > 0 and self.alpha > 0, "lora.r and lora.alpha must be positive")
        require(0 <= self.dropout < 1, "lora.dropout must lie in [0, 1)")
        require(len(self.target_modules) > 0, "lora.target_modules is empty")


@dataclass
class OptimSpec(ConfigBase):
    """AdamW with a cosine schedule after a linear warmup; lr None = the stage's default."""

    lr: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.lr is None or self.lr > 0, "optim.lr must be positive")
        require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio must lie in [0, 1)")
        require(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        require(len(self.betas) == 2, "optim.betas needs two values")


@dataclass
class TrainConfig(ConfigBase):
    """One training run. batch_size is the effective batch (micro batch x accumulation x GPUs)."""

    stage: str
    output_dir: str
    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    tuning: str = "full"
    lora: LoraSpec = field(default_factory=LoraSpec)
    # Stage 1: weight of the distillation term (0 = the paper's cross-entropy alone), see
    # llama_omni/train/stage1.py. Needs transcripts and a backbone that stays itself.
    distill: float = 0.0
    # The teacher's system prompt (None: the model's own). Set it to the one the answers
    # were generated with (the data config's respond prompt), so the teacher's
    # distributions are those of the answers' style.
    distill_system_prompt: str | None = None
    batch_size: int = 32
    micro_batch_size: int = 4
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; None = epochs over the data
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    merge_lora: bool = True  # export: fold LoRA into the LLM weights
    tensorboard: bool = True

    def __post_init__(self) -> None:
        coerce_fields(self)
        require(self.stage in STAGES, f"stage {self.stage!r}: choose one of {STAGES}")
        require(self.tuning in TUNINGS, f"tuning {self.tuning!r}: choose one of {TUNINGS}")
        require(
            self.stage == "stage1" or self.tuning == "full",
            "tuning applies to stage 1 only (align trains the adaptor, stage 2 the speech "
            "decoder); leave it 'full'",
        )
        require(self.distill >= 0, "distill must be >= 0")
        require(
            self.distill == 0 or (self.stage == "stage1" and self.tuning in ("lora", "adaptor")),
            "distill applies to stage 1 with tuning 'lora' or 'adaptor' (its teacher is the "
            "untouched backbone, which a full fine-tune changes)",
        )
        require(self.distill_system_prompt is None or self.distill > 0,
                "distill_system_prompt is the distillation teacher's prompt: set distill > 0 too")
        require(self.precision in PRECISIONS, f"precision {self.precision!r}: choose one of {PRECISIONS}")
        require(
            self.micro_batch_size > 0 and self.batch_size % self.micro_batch_size == 0,
            f"batch_size {self.batch_size} must be a positive multiple of micro_batch_size "
            f"{self.micro_batch_size}",
        )
        require(self.epochs > 0, "epochs must be positive")
        require(self.max_steps is None or self.max_steps > 0, "max_steps must be positive")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            require(getattr(self, name) > 0, f"{name} must be positive")

    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else DEFAULT_LR[self.stage]

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = (), **values: Any) -> TrainConfig:
        """Read YAML (or start empty), apply `key.path=value` overrides and typed `values`."""
        raw: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"training config {path} not found")
            raw = yaml.safe_load(path.read_text()) or {}
            require(isinstance(raw, dict), f"{path}: the top level must be a mapping")
        for item in overrides:
            key, sep, value = item.partition("=")
            require(bool(sep and key), f"override {item!r} must look like key.path=value")
            set_dotted(raw, key.strip(), yaml.safe_load(value) if value else None)
        for key, value in values.items():
            set_dotted(raw, key, value)
        try:
            return cls.from_dict(raw)
        except TypeError as err:  # a required field is missing
            raise ValueError(
                f"training config: {err}; every config needs stage, output_dir and data.train"
            ) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def set_dotted(mapping: dict[str, Any], key: str, value: Any) -> None:
    """mapping["a"]["b"] = value for key "a.b", creating nested mappings on the way."""
    *parents, last = key.split(".")
    node = mapping
    for part in parents:
        child = node.setdefault(part, {})
        require(isinstance(child, dict), f"override {key!r}: {part!r} is not a mapping")
        node = child
    node[last] = value


def coerce_fields(config: Any) -> None:
    """Convert each field to its annotated type where that is lossless (YAML reads `1e-4`
    as a string, the CLI gives strings); raise ValueError naming the field otherwise."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            setattr(config, f.name, _coerce(value, hints[f.name]))
        except (TypeError, ValueError):
            raise ValueError(
                f"{type(config).__name__}.{f.name}: {value!r} is not a valid {_type_name(hints[f.name])}"
            ) from None


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner) for v in value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint is int:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(value)
        return int(float(value))
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return value
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 arithmetic (x86 avx512_bf16 / amx_bf16, Arm bf16);
    None where /proc/cpuinfo cannot tell (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm spelling
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
