"""`llama-omni eval`: the InstructS2S-Eval protocol on a checkpoint (and the cascade)."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated

import typer

DTYPES = ("float32", "bfloat16", "float16")
PRESET_PREFIX = "preset:"


def evaluate(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Argument(
        help="Checkpoint directory (ours or the published format), or 'preset:small' for "
             "the small preset with an untrained adaptor and speech decoder (proves the "
             "pipeline; its scores mean nothing).")],
    eval_set: Annotated[str, typer.Option(
        "--set", help="'sharegpt-heldout' (our 200 held-out questions), an AlpacaEval .json "
                      "file (the paper's recipe), or a JSONL set.")] = "sharegpt-heldout",
    tasks: Annotated[str, typer.Option(help="Comma-separated: s2t, s2s.")] = "s2t,s2s",
    chunk_sizes: Annotated[str, typer.Option(
        help="Omegas of the s2s task, comma-separated; 'inf' = vocode once at the end.")
    ] = "10,40,inf",
    judge: Annotated[str | None, typer.Option(
        help="Base URL of an OpenAI-compatible judge (e.g. http://127.0.0.1:8000/v1); the key "
             "is read from OPENAI_API_KEY. Without it, no judge scores.")] = None,
    judge_model: Annotated[str, typer.Option(help="Model name to ask the judge for.")] = "judge",
    baseline: Annotated[str | None, typer.Option(
        help="'cascade': also run ASR -> LLM -> TTS through the same harness.")] = None,
    cascade_llm: Annotated[str | None, typer.Option(
        help="LLM source for the cascade (a HF directory or packaged name); default: the "
             "model's own LLM.")] = None,
    vocoder: Annotated[Path | None, typer.Option(
        help="Vocoder directory; default: the model's, else the installed default voice.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Work directory with the per-item cache (resumable); default runs/eval/<name>.")
    ] = None,
    report: Annotated[Path | None, typer.Option(
        help="Where to write report.md, summary.json and the plot; default OUT/report.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N items only.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 512,
    repetition_penalty: Annotated[float | None, typer.Option(
        help="> 1 makes tokens an answer already holds less likely (model and cascade); "
             "1 = off, the paper's greedy decoding; default: the model's own "
             "(its config's llm.repetition_penalty).")] = None,
    asr_model: Annotated[Path | None, typer.Option(
        help="CTranslate2 Whisper directory for ASR scoring; default the packaged base.")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch and the scorers.")] = 2,
    device: Annotated[str, typer.Option(help="torch device of the model, e.g. cpu, cuda.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help=f"Model dtype, one of {', '.join(DTYPES)}; default: as stored.")] = None,
) -> None:
    """Evaluate a model on spoken instructions: judge scores, ASR-WER/CER, MOS, latency and
    lagging words per chunk size, decode time, answer fidelity; write the report."""
    from llama_omni.eval.report import summarize, write_report
    from llama_omni.eval.runner import EvalOptions, Evaluator, set_threads, with_llm
    from llama_omni.eval.sets import load_set

    if baseline not in (None, "cascade"):
        raise typer.BadParameter("the only baseline is 'cascade'", param_hint="--baseline")
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"choose one of {DTYPES}", param_hint="--dtype")
    omegas = tuple(_omega(c) for c in chunk_sizes.split(",") if c.strip())
    try:
        options = EvalOptions(
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), chunk_sizes=omegas,
            max_new_tokens=max_new_tokens,
            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
            baseline=baseline == "cascade", judge_url=judge, judge_model=judge_model,
            asr_model=str(asr_model) if asr_model else None, threads=threads, device=device,
        )
    except ValueError as err:  # a setting out of range: refused before anything loads
        raise typer.BadParameter(str(err)) from None
    set_threads(threads)
    set_name, items = load_set(eval_set, limit)
    model, voice, model_label, voice_label = _load(checkpoint, vocoder, device, dtype)
    if repetition_penalty is None:
        options = dataclasses.replace(
            options, repetition_penalty=model.config.llm.repetition_penalty
        )
    name = checkpoint.removeprefix(PRESET_PREFIX) if checkpoint.startswith(PRESET_PREFIX) \
        else Path(checkpoint).name
    out = out or Path("runs/eval") / name
    run_info = {
        "command": _command(ctx),
        "model": model_label, "vocoder": voice_label, "set": f"{set_name} ({len(items)} items)",
        "instruction voices": ", ".join(options.voices), "asr": asr_model.name if asr_model
        else "whisper-base (packaged, faster-whisper int8)",
        "judge": f"{judge_model} at {judge}" if judge else "none",
        "cascade": (f"ASR -> {cascade_llm or 'its own LLM'} -> TTS {options.cascade_voice}, "
                    "spoken sentence by sentence") if options.baseline else "not run",
        "max_new_tokens": max_new_tokens, "device": f"{device} ({threads} threads)",
        "repetition_penalty": options.repetition_penalty,
        "blank_penalty": model.speech_decoder.config.blank_penalty,  # the model's (its config)
    }
    cascade_model = with_llm(model, cascade_llm) if cascade_llm and options.baseline else None
    evaluator = Evaluator(model, voice, options, out, run_info, cascade_model)
    records = evaluator.run(items)
    summary = summarize(records, run_info, options.chunk_sizes, options.reference_omega)
    path = write_report(summary, report or out / "report")
    typer.echo(f"report: {path}")


def _command(ctx: typer.Context) -> str:
    """The command line that reproduces this run (options left at their defaults omitted)."""
    parts = ["llama-omni", "eval", ctx.params["checkpoint"]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "option" and value is not None and value != param.default:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


def _omega(text: str) -> int | None:
    text = text.strip().lower()
    if text in ("inf", "infinity"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise typer.BadParameter(f"expected positive integers or 'inf', got {text!r}",
                                 param_hint="--chunk-sizes")
    return int(text)


def _load(checkpoint: str, vocoder: Path | None, device: str, dtype: str | None):
    """(model, vocoder or None, model label, vocoder label)."""
    import torch

    from llama_omni.inference.defaults import DEFAULT_VOCODER_DIR, model_vocoder
    from llama_omni.inference.engine import vocoder_mismatch
    from llama_omni.model.checkpoint import load_model
    from llama_omni.model.omni import OmniConfig, OmniModel
    from llama_omni.model.vocoder import load_vocoder

    torch_dtype = getattr(torch, dtype) if dtype else None
    fallback = vocoder or (DEFAULT_VOCODER_DIR if DEFAULT_VOCODER_DIR.is_dir() else None)
    if checkpoint.startswith(PRESET_PREFIX):
        preset = checkpoint.removeprefix(PRESET_PREFIX)
        voice = load_vocoder(fallback, device=device) if fallback else None
        config = OmniConfig.preset(preset)
        if voice is not None:  # size the random speech decoder to the vocoder's units
            config = config.replace(speech_decoder=config.speech_decoder.replace(
                unit_vocab=voice.config.num_units))
        torch.manual_seed(0)
        model = OmniModel.initialize(config, device=device, dtype=torch_dtype).eval()
        label = (f"preset '{preset}' with an UNTRAINED adaptor and speech decoder (random, "
                 "seed 0): a pipeline check, not a trained model")
    else:
        model = load_model(checkpoint, device=device, dtype=torch_dtype)
        voice = model_vocoder(model, Path(checkpoint), vocoder)
        if voice is None and fallback is not None:
            voice = load_vocoder(fallback, device=device)
        label = f"checkpoint {checkpoint}"
    if voice is not None:
        problem = vocoder_mismatch(model, voice)
        if problem:
            raise typer.BadParameter(problem, param_hint="--vocoder")
    voice_label = "none"
    if voice is not None:
        voice_label = str(vocoder or model.config.vocoder_source or DEFAULT_VOCODER_DIR)
    return model, voice, label, voice_label
