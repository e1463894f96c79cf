"""Units of the speech decoder against its blank penalty, on held-out reference answers.

A CTC decoder chooses the blank at most positions; a small one chooses it too often and
emits fewer units than the answer needs (sounds go missing). `blank_penalty` (a
SpeechDecoderConfig field, inference only) lowers the blank's log-probability before the
greedy choice. For each penalty this prints how many units the decoder emits against the
data's own units of the same answers, and the ASR-WER of those units through the vocoder
(teacher-forced states of the first --items held-out items, as `llama-omni train heldout`
scores them; Whisper base; corpus and per-answer median).

    python bench/blank_penalty.py runs/candidate8/default-model \\
        --set data.train=runs/data/sharegpt-default --items 30 --penalties 0,0.5,1,1.5,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from llama_omni.eval.wer import corpus_wer, median_wer
from llama_omni.model.vocoder import load_vocoder
from llama_omni.train.config import TrainConfig
from llama_omni.train.heldout import hear_units, load_for_heldout, unit_log_probs
from llama_omni.train.run import load_conversations
from llama_omni.units.quality import ASR


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.load(args.config, args.set or [])
    _, items = load_conversations(cfg.data)
    items = [c for c in items[: args.items] if c.turns[1].units]
    if not items:
        raise SystemExit(f"{args.config}: no held-out items with units (set data.train)")
    if len(items) < args.items:
        print(f"scoring {len(items)} held-out items with units (asked for {args.items})", flush=True)
    model = load_for_heldout(args.model, cfg)
    vocoder, asr = load_vocoder(args.vocoder), ASR(threads=args.threads)
    log_probs = unit_log_probs(model, items, batch_size=4)
    references = [c.turns[1].text for c in items]
    data_units = sum(len(c.turns[1].units) for c in items)
    rows = []
    for penalty in args.penalties:
        decoder, _ = model.speech_decoder.reconfigured(blank_penalty=penalty)
        units = [decoder.greedy_units(lp[None])[0] for lp in log_probs]
        heard = [hear_units(u, vocoder, asr) for u in tqdm(units, desc=f"penalty {penalty}")]
        rows.append(dict(penalty=penalty, units_ratio=round(sum(map(len, units)) / data_units, 3),
                         wer=round(corpus_wer(references, heard), 2),
                         wer_median=round(median_wer(references, heard), 2)))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(dict(model=str(args.model), items=len(items), data_units=data_units,
                          vocoder=str(args.vocoder), rows=rows), indent=2))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="llama-omni checkpoint directory")
    parser.add_argument("--config", type=Path, default=Path("configs/train/small-cpu-stage2.yaml"),
                        help="training config whose held-out split is scored")
    parser.add_argument("--set", action="append", help="config override KEY=VALUE (repeatable)")
    parser.add_argument("--vocoder", type=Path, default=Path("llama_omni/weights/vocoder-hibari"))
    parser.add_argument("--items", type=int, default=30, help="the first N held-out items")
    parser.add_argument("--penalties", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0, 0.5, 1.0, 1.5, 2.0], help="comma-separated, >= 0")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


if __name__ == "__main__":
    main()
