"""A Gradio demo with the paper demo's controls, on the same batched model worker.

One event, `respond` (also the API name gradio_client calls): a recorded or uploaded
question plus the controls in; streamed text, units, spoken answer (WAV chunks that
Gradio joins into one streamed player) and latency out. The conversation state keeps
multi-turn history per browser tab; "New conversation" forgets it.
"""

from __future__ import annotations

import io
import queue
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from llama_omni.audio import AudioError, load_audio
from llama_omni.inference.events import AudioChunk, End, TextDelta, Units
from llama_omni.model.omni import OmniModel
from llama_omni.model.vocoder import UnitVocoder
from llama_omni.serve.scheduler import Failure, Job, QueueFull, Scheduler
from llama_omni.serve.sessions import History, ServerLimits, SessionSettings

EXAMPLES_DIR = Path(__file__).parent / "static" / "examples"


def _wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _answer(scheduler: Scheduler, wave: np.ndarray, settings: SessionSettings, history: History):
    """Stream one turn as (text, units, speech chunk, latency, history) updates."""
    import gradio as gr

    events: queue.Queue = queue.Queue()
    job = scheduler.submit(Job(wave, history, settings.engine_options(), emit=events.put))
    text, units, latency = "", [], ""
    try:
        while True:
            event = events.get()
            chunk = None
            if isinstance(event, Failure):
                raise gr.Error(event.message)
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Units):
                units += event.units
            elif isinstance(event, AudioChunk) and event.audio.size:
                chunk = _wav_bytes(event.audio, event.sample_rate)
                latency = latency or f"first audio after {_ms_since(job.t_end):.0f} ms"
            elif isinstance(event, End):
                latency = (
                    f"{latency or 'no audio'}; answer done after {_ms_since(job.t_end):.0f} ms"
                )
                history.add(job.speech, text, job.cache_slot)
            yield text, " ".join(map(str, units)), chunk, latency, history
            if isinstance(event, End):
                return
    finally:
        job.cancel()  # the tab went away or the user pressed stop


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1000.0


def build_demo(scheduler: Scheduler, limits: ServerLimits, title: str = "LLaMA-Omni"):
    import gradio as gr

    def respond(audio_path, temperature, top_p, repetition_penalty, max_new_tokens, chunk_size,
                history):
        history = history or History(limits.max_history)
        if not audio_path:
            raise gr.Error("Record or upload a question first.")
        try:
            wave = load_audio(audio_path)
            if wave.size > limits.max_audio_seconds * 16000:
                raise AudioError(
                    f"the question lasts over {limits.max_audio_seconds:g} s; ask a shorter one"
                )
            settings = SessionSettings(
                temperature=float(temperature),
                top_p=float(top_p),
                repetition_penalty=float(repetition_penalty),
                max_new_tokens=min(int(max_new_tokens), limits.max_new_tokens),
                chunk_size=int(chunk_size),
            )
            yield from _answer(scheduler, wave, settings, history)
        except (AudioError, ValueError, QueueFull) as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nAsk by voice; the answer streams as text and speech.")
        history = gr.State(None)
        with gr.Row():
            with gr.Column():
                question = gr.Audio(
                    sources=["microphone", "upload"], type="filepath", label="Question"
                )
                temperature = gr.Slider(
                    0, 1, value=0.0, step=0.05, label="Temperature (0 = greedy)"
                )
                top_p = gr.Slider(0.05, 1, value=0.7, step=0.05, label="Top-p")
                repetition_penalty = gr.Slider(  # starts at the model's own
                    1, 2, value=scheduler.model.config.llm.repetition_penalty, step=0.05,
                    label="Repetition penalty (1 = off)",
                )
                max_new_tokens = gr.Slider(
                    1,
                    limits.max_new_tokens,
                    value=min(512, limits.max_new_tokens),
                    step=1,
                    label="Max new tokens",
                )
                chunk_size = gr.Slider(
                    1, 200, value=40, step=1, label="Chunk size (units per vocoder call)"
                )
                with gr.Row():
                    submit = gr.Button("Answer", variant="primary")
                    reset = gr.Button("New conversation")
            with gr.Column():
                text = gr.Textbox(label="Answer (text)", lines=6)
                units = gr.Textbox(label="Units", lines=3)
                speech = gr.Audio(
                    label="Answer (speech)", streaming=True, autoplay=True, interactive=False
                )
                latency = gr.Textbox(label="Latency")
        examples = sorted(EXAMPLES_DIR.glob("*.flac"))
        if examples:
            gr.Examples([[str(path)] for path in examples], inputs=[question])
        submit.click(
            respond,
            [question, temperature, top_p, repetition_penalty, max_new_tokens, chunk_size, history],
            [text, units, speech, latency, history],
            api_name="respond",
        )
        reset.click(
            lambda: (None, "", "", ""), None, [history, text, units, latency], api_name="reset"
        )
    return demo


def launch(
    model: OmniModel,
    vocoder: UnitVocoder | None,
    host: str = "127.0.0.1",
    port: int = 7860,
    title: str = "LLaMA-Omni",
    limits: ServerLimits | None = None,
) -> None:
    """Run the model worker and the Gradio server until interrupted."""
    from llama_omni.inference.engine import vocoder_mismatch

    scheduler = Scheduler(model, None if vocoder_mismatch(model, vocoder) else vocoder)
    scheduler.start()
    demo = build_demo(scheduler, limits or ServerLimits(), title)
    demo.queue(default_concurrency_limit=8)
    try:
        demo.launch(server_name=host, server_port=port, share=False, show_error=True)
    finally:
        scheduler.stop()
