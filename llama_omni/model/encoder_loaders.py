"""Load Whisper encoder weights from openai `.pt`, Hugging Face and CTranslate2 files.

Every loader returns `(EncoderConfig, WhisperEncoder)` with the sizes read from the file and
the weights loaded strictly: a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from llama_omni.model.encoder import EncoderConfig, WhisperEncoder

ACCEPTED_SOURCES = (
    '"packaged:whisper-base", "packaged:whisper-tiny.en", an openai-whisper .pt checkpoint, '
    "a Hugging Face Whisper directory (config.json with model_type whisper + safetensors or "
    "pytorch_model.bin), or a CTranslate2 Whisper directory (model.bin)"
)


class EncoderLoadError(ValueError):
    """Encoder weights cannot be loaded: wrong kind of file, damaged, or not matching."""


def load_encoder(
    source: str, *, pad_to_30s: bool, device=None, dtype=None
) -> tuple[EncoderConfig, WhisperEncoder]:
    """Load a Whisper encoder from any supported source (see ACCEPTED_SOURCES)."""
    kw = dict(pad_to_30s=pad_to_30s, device=device, dtype=dtype)
    if source.startswith("packaged:"):
        return load_ct2_whisper(_packaged_dir(source.removeprefix("packaged:")), **kw)
    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        return load_openai_whisper_checkpoint(path, **kw)
    if (path / "model.bin").is_file():
        return load_ct2_whisper(path, **kw)
    if (path / "config.json").is_file():
        return load_hf_whisper(path, **kw)
    reason = "it does not exist" if not path.exists() else "it is none of these"
    raise EncoderLoadError(
        f"cannot load a Whisper encoder from {source!r}: {reason}. Accepted: {ACCEPTED_SOURCES}."
    )


def _packaged_dir(name: str) -> Path:
    from llama_omni import packaged

    dirs = {
        "whisper-base": packaged.whisper_base_dir,
        "whisper-tiny.en": packaged.whisper_tiny_en_dir,
    }
    if name not in dirs:
        raise EncoderLoadError(f"unknown packaged encoder {name!r}; packaged: {sorted(dirs)}")
    return dirs[name]()


# ---- openai-whisper .pt ----------------------------------------------------------------------


def load_openai_whisper_checkpoint(
    path: str | Path, *, pad_to_30s: bool = True, device=None, dtype=None
) -> tuple[EncoderConfig, WhisperEncoder]:
    """An openai-whisper checkpoint: {"dims": {...}, "model_state_dict": {"encoder.*": ...}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"openai-whisper checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise EncoderLoadError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise EncoderLoadError(
            f"{path} is not an openai-whisper checkpoint: expected keys 'dims' and "
            f"'model_state_dict', found {found}"
        )
    dims = checkpoint["dims"]
    fields = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
    missing = [f for f in fields if f not in dims]
    if missing:
        raise EncoderLoadError(f"{path}: 'dims' lacks {missing}")
    config = EncoderConfig(
        n_mels=dims["n_mels"],
        n_ctx=dims["n_audio_ctx"],
        width=dims["n_audio_state"],
        n_heads=dims["n_audio_head"],
        n_layers=dims["n_audio_layer"],
        pad_to_30s=pad_to_30s,
    )
    state = {
        name.removeprefix("encoder."): tensor
        for name, tensor in checkpoint["model_state_dict"].items()
        if name.startswith("encoder.")
    }
    encoder = encoder_from_state_dict(config, state, source=str(path), device=device, dtype=dtype)
    return config, encoder


# ---- Hugging Face ------------------------------------------------------------------------------

_HF_RULES = [
    (r"embed_positions\.weight", "positional_embedding"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(\w+)", r"blocks.\1.attn.query.\2"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(\w+)", r"blocks.\1.attn.key.\2"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(\w+)", r"blocks.\1.attn.value.\2"),
    (r"layers\.(\d+)\.self_attn\.out_proj\.(\w+)", r"blocks.\1.attn.out.\2"),
    (r"layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"blocks.\1.attn_ln.\2"),
    (r"layers\.(\d+)\.fc1\.(\w+)", r"blocks.\1.mlp.0.\2"),
    (r"layers\.(\d+)\.fc2\.(\w+)", r"blocks.\1.mlp.2.\2"),
    (r"layers\.(\d+)\.final_layer_norm\.(\w+)", r"blocks.\1.mlp_ln.\2"),
    (r"layer_norm\.(\w+)", r"ln_post.\1"),
]


def load_hf_whisper(
    directory: str | Path, *, pad_to_30s: bool = True, device=None, dtype=None
) -> tuple[EncoderConfig, WhisperEncoder]:
    """A Hugging Face WhisperModel / WhisperForConditionalGeneration directory."""
    directory = Path(directory)
    hf = _read_json(directory / "config.json")
    if hf.get("model_type") != "whisper":
        raise EncoderLoadError(
            f"{directory} is not a Hugging Face Whisper model "
            f"(config.json model_type is {hf.get('model_type')!r}, expected 'whisper')"
        )
    fields = dict(
        n_mels="num_mel_bins",
        n_ctx="max_source_positions",
        width="d_model",
        n_heads="encoder_attention_heads",
        n_layers="encoder_layers",
    )
    missing = sorted(key for key in fields.values() if key not in hf)
    if missing:
        raise EncoderLoadError(f"{directory}/config.json lacks {missing}")
    config = EncoderConfig(**{f: hf[key] for f, key in fields.items()}, pad_to_30s=pad_to_30s)
    state = {}
    for name, load in _hf_tensors(directory):
        for prefix in ("model.encoder.", "encoder."):
            if name.startswith(prefix):
                state[_rename(name.removeprefix(prefix), _HF_RULES)] = load()
    encoder = encoder_from_state_dict(
        config, state, source=str(directory), device=device, dtype=dtype
    )
    return config, encoder


def _hf_tensors(directory: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) for every tensor of a HF checkpoint, single file or sharded."""
    for stem in ("model.safetensors", "pytorch_model.bin"):
        index = directory / f"{stem}.index.json"
        if index.is_file():
            files = sorted(set(_read_json(index)["weight_map"].values()))
        elif (directory / stem).is_file():
            files = [stem]
        else:
            continue
        for file in files:
            yield from _file_tensors(directory / file)
        return
    raise EncoderLoadError(
        f"{directory} has no weights: expected model.safetensors or pytorch_model.bin "
        "(or their .index.json for sharded checkpoints)"
    )


def _file_tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, lambda f=f, name=name: f.get_tensor(name)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield name, lambda t=tensor: t


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EncoderLoadError(f"cannot read {path}: {err}") from err


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    """First matching rule's rewrite; an unknown name stays as is (and is reported later)."""
    for pattern, template in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(template)
    return name


# ---- CTranslate2 -------------------------------------------------------------------------------

_CT2_VERSIONS = (4, 5, 6)  # binary versions with dtype ids and byte counts (CTranslate2 >= 2)
_CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # 5 = bfloat16, read as raw 16-bit words
}
_CT2_RULES = [
    (r"conv([12])/(weight|bias)", r"conv\1.\2"),
    (r"position_encodings/encodings", "positional_embedding"),
    (r"layer_(\d+)/self_attention/layer_norm/(weight|bias)", r"blocks.\1.attn_ln.\2"),
    (r"layer_(\d+)/self_attention/linear_1/(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"layer_(\d+)/ffn/layer_norm/(weight|bias)", r"blocks.\1.mlp_ln.\2"),
    (r"layer_(\d+)/ffn/linear_0/(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (r"layer_(\d+)/ffn/linear_1/(weight|bias)", r"blocks.\1.mlp.2.\2"),
    (r"layer_norm/(weight|bias)", r"ln_post.\1"),
]
_FUSED_QKV = re.compile(r"layer_(\d+)/self_attention/linear_0/(weight|bias)")


def load_ct2_whisper(
    directory: str | Path, *, pad_to_30s: bool = True, device=None, dtype=None
) -> tuple[EncoderConfig, WhisperEncoder]:
    """The encoder of a CTranslate2 Whisper model (`model.bin`, float or int8/int16 weights)."""
    path = Path(directory) / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    variables = read_ct2_variables(path, keep=lambda name: name.startswith("encoder/"))
    variables = {name.removeprefix("encoder/"): v for name, v in variables.items()}
    if "num_heads" not in variables:
        raise EncoderLoadError(f"{path}: missing variable encoder/num_heads")
    n_heads = int(variables.pop("num_heads"))
    state = _ct2_to_openai(_dequantize(variables, str(path)), str(path))
    config = _config_from_state(state, n_heads, pad_to_30s, str(path))
    encoder = encoder_from_state_dict(config, state, source=str(path), device=device, dtype=dtype)
    return config, encoder


def _config_from_state(
    state: dict[str, torch.Tensor], n_heads: int, pad_to_30s: bool, source: str
) -> EncoderConfig:
    """Sizes read off the tensors (CTranslate2 files store only the head count)."""
    for name in ("conv1.weight", "positional_embedding"):
        if name not in state:
            raise EncoderLoadError(f"{source}: missing tensor {name} (needed to size the encoder)")
    layers = {int(name.split(".")[1]) for name in state if name.startswith("blocks.")}
    if not layers:
        raise EncoderLoadError(f"{source}: no encoder layers found")
    width, n_mels, _ = state["conv1.weight"].shape
    return EncoderConfig(
        n_mels=n_mels,
        n_ctx=state["positional_embedding"].shape[0],
        width=width,
        n_heads=n_heads,
        n_layers=max(layers) + 1,
        pad_to_30s=pad_to_30s,
    )


def read_ct2_variables(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Parse a CTranslate2 model.bin; return the variables whose name passes `keep`.

    Layout (little-endian): uint32 version, spec name, uint32 revision, uint32 count, then per
    variable: name, uint8 rank, rank x uint32 dims, uint8 dtype id, uint32 byte count, bytes;
    then uint32 alias count and (alias, target) name pairs. Names are uint16-length-prefixed,
    NUL-terminated strings. Only kept variables are copied out of the memory map.
    """
    if path.stat().st_size == 0:
        raise EncoderLoadError(f"{path} is empty; re-download or re-convert the model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        reader = _Reader(buf, path)
        version = reader.uint("I", "the binary version")
        if version not in _CT2_VERSIONS:
            raise EncoderLoadError(
                f"{path}: unsupported CTranslate2 binary version {version} (this reader knows "
                f"{list(_CT2_VERSIONS)}); is it a CTranslate2 model.bin? Re-convert it with "
                "a current ctranslate2 if so."
            )
        spec = reader.string("the spec name")
        if spec != "WhisperSpec":
            raise EncoderLoadError(
                f"{path} holds a CTranslate2 {spec!r} model, not Whisper "
                "(expected spec WhisperSpec)"
            )
        reader.uint("I", "the spec revision")
        variables = {}
        for _ in range(reader.uint("I", "the variable count")):
            name, tensor = reader.variable(keep)
            if tensor is not None:
                variables[name] = tensor
        for _ in range(reader.uint("I", "the alias count")):
            alias, target = reader.string("an alias name"), reader.string("an alias target")
            # An aliased weight shares its quantization scale; copies keep parameters untied.
            for suffix in ("", "_scale"):
                if keep(alias + suffix) and target + suffix in variables:
                    variables[alias + suffix] = variables[target + suffix].clone()
    return variables


class _Reader:
    """Cursor over a memory-mapped model.bin; running past the end is a clear error.

    Data are copied out at once (never viewed), so no buffer export outlives the map.
    """

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def skip(self, size: int, what: str) -> int:
        """Advance past `size` bytes; return where they start."""
        if self.pos + size > len(self.buf):
            raise EncoderLoadError(
                f"{self.path} is truncated or corrupt: reading {what} needs {size} bytes at "
                f"offset {self.pos}, but the file has {len(self.buf)} bytes. Re-download or "
                "re-convert the model."
            )
        self.pos += size
        return self.pos - size

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.skip(size, what))

    def uint(self, fmt: str, what: str) -> int:
        return self.unpack(fmt, what)[0]

    def string(self, what: str) -> str:
        size = self.uint("H", what)
        start = self.skip(size, what)
        try:
            return self.buf[start : start + size].rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as err:
            raise EncoderLoadError(f"{self.path} is corrupt: {what} is not text") from err

    def variable(self, keep: Callable[[str], bool]) -> tuple[str, torch.Tensor | None]:
        name = self.string("a variable name")
        rank = self.uint("B", f"the rank of {name}")
        dims = self.unpack(f"{rank}I", f"the shape of {name}")
        type_id = self.uint("B", f"the dtype of {name}")
        size = self.uint("I", f"the size of {name}")
        start = self.skip(size, f"the data of {name}")
        if not keep(name):
            return name, None
        if type_id not in _CT2_DTYPES:
            raise EncoderLoadError(f"{self.path}: {name} has unknown dtype id {type_id}")
        dtype = _CT2_DTYPES[type_id]
        count = int(np.prod(dims))
        if size != dtype.itemsize * count:
            raise EncoderLoadError(
                f"{self.path} is corrupt: {name} has shape {list(dims)} "
                f"but {size} bytes of dtype {dtype}"
            )
        array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).copy()
        tensor = torch.from_numpy(array.reshape(dims))
        return name, tensor.view(torch.bfloat16) if type_id == 5 else tensor


def _dequantize(variables: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Fold `X_scale` companions into float tensors (CTranslate2 stores q = round(w * scale))."""
    out = {}
    for name, tensor in variables.items():
        if name.endswith("_scale"):
            continue
        if name.endswith("_zero"):
            raise EncoderLoadError(
                f"{source}: {name} marks AWQ-quantized weights, which this "
                "loader does not support; convert with float16 or int8"
            )
        scale = variables.get(f"{name}_scale")
        if tensor.dtype in (torch.int8, torch.int16) and scale is not None:
            scale = scale.float().reshape(-1, *[1] * (tensor.dim() - 1)) if scale.dim() else scale
            tensor = tensor.float() / scale  # per output row (int8) or global (int16)
        elif not tensor.is_floating_point():
            raise EncoderLoadError(
                f"{source}: {name} has dtype {tensor.dtype} without a float {name}_scale; "
                "supported: float32, float16, bfloat16, and int8/int16 with weight_scale"
            )
        out[name] = tensor
    return out


def _ct2_to_openai(variables: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """CTranslate2 encoder names -> openai-whisper names; unknown names pass through as is."""
    state = {}
    for name, tensor in variables.items():
        name = name.replace("/gamma", "/weight").replace("/beta", "/bias")
        fused = _FUSED_QKV.fullmatch(name)
        if fused is None:
            state[_rename(name, _CT2_RULES)] = tensor
            continue
        if tensor.shape[0] % 3:
            raise EncoderLoadError(
                f"{source}: fused attention tensor encoder/{name} has shape "
                f"{list(tensor.shape)}, not 3 x width rows"
            )
        layer, kind = fused.groups()
        query, key, value = tensor.chunk(3)
        state[f"blocks.{layer}.attn.query.{kind}"] = query
        state[f"blocks.{layer}.attn.value.{kind}"] = value
        if kind == "weight":  # a key bias only shifts each query's logits: softmax ignores it
            state[f"blocks.{layer}.attn.key.weight"] = key
    return state


# ---- strict loading ----------------------------------------------------------------------------


def encoder_from_state_dict(
    config: EncoderConfig,
    state: dict[str, torch.Tensor],
    *,
    source: str = "state dict",
    device=None,
    dtype=None,
) -> WhisperEncoder:
    """A WhisperEncoder holding `state` (openai-whisper names), checked strictly.

    Built on the meta device, then the (cast) tensors are assigned, so nothing is initialised
    twice. `dtype` defaults to float32; `source` names the origin in error messages.
    """
    encoder = WhisperEncoder(config, device="meta")
    expected = encoder.state_dict()
    problems = [
        _listing("missing tensors", sorted(set(expected) - set(state))),
        _listing("unexpected tensors", sorted(set(state) - set(expected))),
        _listing(
            "tensors of the wrong shape",
            [
                f"{name} {list(state[name].shape)} (expected {list(ref.shape)})"
                for name, ref in expected.items()
                if name in state and state[name].shape != ref.shape
            ],
        ),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise EncoderLoadError(
            f"{source} does not match a Whisper encoder with {config.to_dict()} "
            f"(names in openai-whisper form): {'; '.join(problems)}"
        )
    dtype = dtype or torch.float32
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval()


def _listing(what: str, names: list[str], limit: int = 8) -> str:
    if not names:
        return ""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what}: {', '.join(names[:limit])}{more}"
