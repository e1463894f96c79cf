"""Evaluation: the InstructS2S-Eval protocol (SPEC section 6) for any checkpoint.

    sets.py     eval sets (JSONL, the ShareGPT hold-out, the paper's AlpacaEval recipe), speech
    wer.py      ASR-WER/CER counts (the project's one definition)
    metrics.py  DNSMOS/UTMOS, stream times, MiniLM answer fidelity
    judge.py    content/style scores from an OpenAI-compatible LLM judge
    cascade.py  the ASR -> LLM -> TTS baseline on the same events and clock
    runner.py   Evaluator: every item, system and stage, cached per item (resumable)
    report.py   summary JSON, Markdown tables (the paper's Tables 1-3), latency/quality plot
"""
