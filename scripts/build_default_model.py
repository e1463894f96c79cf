"""Assemble the shipped default model from a stage-1 run (LoRA) and a stage-2 checkpoint.

    python scripts/build_default_model.py --stage1-run runs/small-cpu/stage1 \
        --stage2 runs/small-cpu/stage2/final [--out llama_omni/weights/default-model]
    python scripts/build_default_model.py --stage1-model llama_omni/weights/default-model \
        --stage2 runs/small-cpu/stage2/final     # a new speech decoder, the same stage 1

The result references the packaged parts (Whisper base, SmolLM2-135M-Instruct, the
vocoder beside it) and stores only what training produced: the adaptor and speech
decoder (`model.safetensors`) and the LLM's LoRA update (`lora/`, folded in on load),
all in float16. It is written next to --out and moved into place when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llama_omni.inference.defaults import DEFAULT_MODEL_DIR, DEFAULT_VOCODER_DIR
from llama_omni.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model
from llama_omni.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_SUBDIR
from llama_omni.train.export import export_run


def main() -> None:
    args = parse_args()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if args.stage1_model is not None:
            staged = Path(shutil.copytree(args.stage1_model, work / "model"))
        else:
            staged = export_run(args.stage1_run, work / "model", merge=False)
        if not (staged / LORA_SUBDIR).is_dir():
            raise SystemExit(f"{args.stage1_run or args.stage1_model} has no LoRA: nothing small to ship")
        decoder = {
            k: v for k, v in load_file(args.stage2 / WEIGHTS_FILE).items() if k.startswith("speech_decoder.")
        }
        tensors = load_file(staged / WEIGHTS_FILE)
        tensors.update(decoder)
        save_file(_half(tensors), staged / WEIGHTS_FILE, metadata={"format": "pt"})
        adapter = staged / LORA_SUBDIR / ADAPTER_WEIGHTS
        save_file(_half(load_file(adapter)), adapter, metadata={"format": "pt"})
        payload = json.loads((staged / CONFIG_FILE).read_text())
        # the decoder's config (e.g. its attention window) comes with its weights
        stage2_config = json.loads((args.stage2 / CONFIG_FILE).read_text())["config"]
        payload["config"]["speech_decoder"] = stage2_config["speech_decoder"]
        adapter_config = staged / LORA_SUBDIR / ADAPTER_CONFIG  # drop this machine's path
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = payload["config"]["llm"]["source"]
        settings["target_modules"] = sorted(settings["target_modules"])  # peft keeps a set
        adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
        payload["config"]["vocoder_source"] = str(Path("..") / DEFAULT_VOCODER_DIR.name)
        (staged / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        load_model(staged)  # refuse to install anything that does not load
        if out.exists():
            card = out / "MODEL_CARD.md"  # written by hand: kept across rebuilds
            if card.is_file():
                shutil.copy2(card, staged / card.name)
            shutil.rmtree(out)
        (staged / LORA_SUBDIR / "README.md").unlink(missing_ok=True)  # peft's empty template
        staged.chmod(0o755)
        staged.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": str(out), "megabytes": round(size / 2**20, 1)}))


def _half(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage1 = parser.add_mutually_exclusive_group(required=True)
    stage1.add_argument("--stage1-run", type=Path, help="stage-1 run directory (LoRA)")
    stage1.add_argument("--stage1-model", type=Path,
                        help="a model built by this script: keep its adaptor and LoRA")
    parser.add_argument("--stage2", type=Path, required=True, help="stage-2 exported checkpoint directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    return parser.parse_args()


if __name__ == "__main__":
    main()
