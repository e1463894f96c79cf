"""Speed of one stage-2 training step of the speech decoder, fp32 vs bf16 autocast: prints
one JSON object.

    python bench/decoder_train_step.py [--model DIR] [--tokens 70] [--batch 4]
                                       [--repeats 5] [--threads 2]

The decoder is the model's (default: the installed default model) with random weights of
its shape; the step is forward, CTC loss and backward on random answer states of --tokens
tokens (70 is a typical ShareGPT answer sentence group; with lambda = 25 that is 1,750
upsampled positions) and random unit targets (10 units per token, as in the data). Both
precisions alternate in one process; figures are medians. `precision: bf16` in a training
config selects the bf16 path (`--precision bf16` on the command line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llama_omni.inference.defaults import default_model_dir
from llama_omni.model.checkpoint import read_config
from llama_omni.model.speech_decoder import SpeechDecoder

PRECISIONS = ("fp32", "bf16")


def step_seconds(decoder: SpeechDecoder, states, lengths, targets, precision: str) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        log_probs, out_lengths = decoder(states, lengths)  # [B, T, K+1]
        loss = decoder.ctc_loss(log_probs, out_lengths, targets)
    loss.backward()
    decoder.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    parser.add_argument("--tokens", type=int, default=70)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = args.model or default_model_dir()
    if model_dir is None:
        parser.error("no default model is installed: pass --model DIR")
    config = read_config(model_dir).speech_decoder
    decoder = SpeechDecoder(config).train()
    states = torch.randn(args.batch, args.tokens, config.input_width)  # [B, M, Din]
    lengths = torch.full((args.batch,), args.tokens)
    targets = torch.randint(0, config.unit_vocab, (args.batch, 10 * args.tokens))  # [B, U]
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for precision in PRECISIONS:  # warm-up
        step_seconds(decoder, states, lengths, targets, precision)
    for _ in range(args.repeats):
        for precision in PRECISIONS:
            times[precision].append(step_seconds(decoder, states, lengths, targets, precision))
    median = {p: statistics.median(t) for p, t in times.items()}
    print(json.dumps({
        "model": str(model_dir),
        "decoder": {"layers": config.n_layers, "width": config.width, "ffn": config.ffn,
                    "upsample": config.upsample, "attention_window": config.attention_window},
        "batch": args.batch, "tokens": args.tokens, "positions": args.tokens * config.upsample,
        "threads": args.threads, "repeats": args.repeats,
        "step_seconds": {p: round(s, 3) for p, s in median.items()},
        "bf16_speedup": round(median["fp32"] / median["bf16"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
