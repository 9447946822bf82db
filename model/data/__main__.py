"""CLI: ``python -m model.data --out DIR --train N --val N --test N --seed S [--workers W] [--records]``.

Writes ``DIR/audio/<split>/*.wav`` and ``DIR/manifest.jsonl``; with ``--records`` also ``DIR/records_<split>.jsonl``
(ASR, QA and caption chat records, seeded per clip so they too are reproducible).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from model.data.synth import SPLITS, generate_dataset, read_manifest
from model.data.tasks import to_chat_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=2800, help="number of training clips")
    parser.add_argument("--val", type=int, default=100, help="number of validation clips")
    parser.add_argument("--test", type=int, default=100, help="number of test clips")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same bytes)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--records", action="store_true", help="also write chat records per split")
    parser.add_argument("--questions", type=int, default=2, help="QA items per clip in the records")
    return parser.parse_args(argv)


def write_records(manifest: Path, seed: int, n_questions: int) -> list[Path]:
    """One JSONL of chat records per split; audio paths are relative to the manifest's directory."""
    paths = []
    metas = read_manifest(manifest)
    for split in SPLITS:
        path = manifest.parent / f"records_{split}.jsonl"
        with open(path, "w", encoding="utf-8") as handle:
            for meta in (m for m in metas if m["split"] == split):
                rng = np.random.default_rng([seed, 7, meta["index"], SPLITS.index(split)])
                for record in to_chat_records(meta, meta["audio"], rng, n_questions):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Generate the dataset and print a short summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    manifest = generate_dataset(args.out, args.train, args.val, args.test, seed=args.seed, workers=args.workers)
    metas = read_manifest(manifest)
    hours = sum(m["duration_s"] for m in metas) / 3600
    scenes = Counter(m["scene"] for m in metas)
    print(f"wrote {len(metas)} clips ({hours:.2f} h) to {manifest} in {time.perf_counter() - started:.1f} s")
    print("scenes: " + ", ".join(f"{k} {v}" for k, v in sorted(scenes.items())))
    if args.records:
        for path in write_records(manifest, args.seed, args.questions):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
