"""How much of a training step's compute goes to padding, with and without
data.group_by_length: prints one JSON object.

    python bench/batch_padding.py MANIFEST_DIR [--micro-batch-size 4] [--seed 0]

Stage 2's cost grows with each micro-batch's longest answer (units); the useful fraction
is real unit positions / padded positions over one epoch of EpochBatches, the trainer's
sampler, with the same seed both ways.
"""

from __future__ import annotations

import argparse
import json

from llama_omni.train.batches import EpochBatches
from llama_omni.train.data import read_conversations


def useful_fraction(lengths: list[int], sampler: EpochBatches) -> float:
    real = padded = 0
    for batch in sampler:
        real += sum(lengths[i] for i in batch)
        padded += len(batch) * max(lengths[i] for i in batch)
    return real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="a data-pipeline manifest directory")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = [len(turn.units) for c in read_conversations(args.manifest)
               for turn in c.turns if turn.role == "assistant" and turn.units]
    if not lengths:
        parser.error(f"{args.manifest}: no answer has units")
    size, mb = len(lengths), args.micro_batch_size
    plain = useful_fraction(lengths, EpochBatches(size, mb, args.seed))
    grouped = useful_fraction(lengths, EpochBatches(size, mb, args.seed, lengths))
    print(json.dumps({
        "manifest": args.manifest, "answers": size, "micro_batch_size": mb,
        "useful_fraction": {"random": round(plain, 3), "group_by_length": round(grouped, 3)},
        "padded_positions_random_over_grouped": round(grouped / plain, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
