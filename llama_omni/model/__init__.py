"""The LLaMA-Omni model, one module per stage: E -> A -> M -> D -> V.

encoder.py (E, Whisper encoder) -> adaptor.py (A) -> llm.py (M) ->
speech_decoder.py (D, CTC unit decoder) -> vocoder.py (V, unit HiFi-GAN);
omni.py assembles them, checkpoint.py saves / loads / imports them.
"""
