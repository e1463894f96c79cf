"""Serving: a Realtime-style voice API, streamed HTTP answers, a web voice chat, a Gradio demo.

    app.py         FastAPI app factory: routes, health, metrics, API key
    realtime.py    one WebSocket connection: client events, answer streaming, turn detection
    protocol.py    the JSON events (OpenAI Realtime names), session settings, errors
    upload.py      POST /v1/respond: an uploaded file -> NDJSON events
    responses.py   engine events -> wire events (PCM16 at the session rate), latencies
    scheduler.py   the model worker: bounded queue, batches across sessions, cancellation
    kvcache.py     per-session LLM caches merged into a batch and split back
    sessions.py    session state, multi-turn history, limits
    vad.py         Silero VAD end-of-turn detection and barge-in
    audio_io.py    uploads (WAV/FLAC/OGG/MP3, WebM via ffmpeg), PCM16, streaming resampling
    metrics.py     counters and latency percentiles
    gradio_app.py  the Gradio demo
    static/        the web page (index.html, app.js, capture-worklet.js, style.css, examples)
"""
