"""Streaming inference: decoding loop, speech path, chunked vocoding, events, sessions.

engine.py          Engine: prefill + one token per step over SpeechLLM with a KV cache
runner.py          the next LLM step on a helper thread while the speech path runs
speech_path.py     c_i -> units (incremental speech decoder) -> audio chunks every Omega units
speech_worker.py   the speech path in a child process (the default on CPU)
vocoder_stream.py  StreamingVocoder: seamless (default) or independent chunk vocoding
sampling.py        greedy / temperature / top-p token selection, seeded
events.py          TextDelta, Units, AudioChunk, End (ms since the input audio ended)
session.py         Conversation: multi-turn prompts reusing the KV cache
defaults.py        where the default model and vocoder are installed
"""
