"""DataFlux command line.

  python -m dataflux_ui run --audio-dir DIR --db URL [--limit N] [--engine local|ray] [--model SRC]
  python -m dataflux_ui export --db URL --status accepted|kept --format jsonl|hf --out PATH
  python -m dataflux_ui import SOURCE(folder|zip) --dest DIR
  python -m dataflux_ui quality --clips N [--model SRC] [--simulate PA,PB] [--out JSON]
  python -m dataflux_ui stats --db URL

``--db`` takes any SQLAlchemy URL (``postgresql+psycopg://…``) or a SQLite file path. ``run`` is resumable: run it
again after any interruption and it finishes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_DB = "runs/dataflux.sqlite"


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="caption, question, answer and judge every clip of a folder")
    run.add_argument("--audio-dir", required=True, help="folder of audio files (a manifest.jsonl adds ground truth)")
    run.add_argument("--db", default=DEFAULT_DB, help=f"SQLAlchemy URL or SQLite file path (default {DEFAULT_DB})")
    run.add_argument("--limit", type=int, default=None, help="process at most N clips (sorted by path)")
    run.add_argument("--engine", choices=("local", "ray"), default="local")
    run.add_argument("--model", default="", help="model source for captioner and answerers (default: mini, else "
                                                  "tiny-random)")
    run.add_argument("--model-b", default="", help="a second checkpoint for Model B (default: Model A's, sampled)")
    run.add_argument("--captioner", choices=("model", "reference"), default="model")
    run.add_argument("--generator", choices=("offline", "llm"), default="offline")
    run.add_argument("--judge", choices=("rule", "llm"), default="rule")
    run.add_argument("--llm-url", default="", help="OpenAI-compatible API root for --generator/--judge llm "
                                                    "(default: the in-process backbone)")
    run.add_argument("--llm-model", default="default")
    run.add_argument("--categories-per-clip", type=int, default=2)
    run.add_argument("--caption-tokens", type=int, default=200)
    run.add_argument("--answer-tokens", type=int, default=32)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dataflux_ui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    exp = sub.add_parser("export", help="write verified samples as training records")
    exp.add_argument("--db", default=DEFAULT_DB)
    exp.add_argument("--status", choices=("accepted", "kept"), default="kept")
    exp.add_argument("--format", choices=("jsonl", "hf"), default="jsonl")
    exp.add_argument("--out", required=True)
    imp = sub.add_parser("import", help="copy audio from a folder or zip (refuses traversal and escaping links)")
    imp.add_argument("source")
    imp.add_argument("--dest", required=True)
    qual = sub.add_parser("quality", help="measure the filter on synthetic clips with known answers")
    qual.add_argument("--clips", type=int, default=40)
    qual.add_argument("--model", default="")
    qual.add_argument("--seed", type=int, default=0)
    qual.add_argument("--categories-per-clip", type=int, default=2)
    qual.add_argument("--caption-tokens", type=int, default=200)
    qual.add_argument("--simulate", default="", metavar="PA,PB",
                      help="simulated answerers right with these probabilities (measures the judge alone)")
    qual.add_argument("--out", default="runs/dataflux_quality.json")
    st = sub.add_parser("stats", help="retention, judge-vs-human kappa, answerer accuracy")
    st.add_argument("--db", default=DEFAULT_DB)
    return parser.parse_args(argv)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineConfig, run_pipeline
    from .store import open_store

    config = PipelineConfig(model=args.model, model_b=args.model_b, captioner=args.captioner,
                            generator=args.generator, judge=args.judge, llm_url=args.llm_url,
                            llm_model=args.llm_model, categories_per_clip=args.categories_per_clip,
                            caption_tokens=args.caption_tokens, answer_tokens=args.answer_tokens, seed=args.seed)
    with open_store(args.db) as store:
        counts = run_pipeline(store, args.audio_dir, config, limit=args.limit, engine=args.engine,
                              progress=not args.quiet)
    print(json.dumps(counts))
    return 1 if counts["failed_clips"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .store import open_store

    with open_store(args.db) as store:
        count = export(store, args.status, args.format, args.out)
    print(f"wrote {count} {args.status} samples to {args.out} ({args.format})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import ImportRefused, import_path

    try:
        files = import_path(args.source, args.dest)
    except ImportRefused as exc:
        print(f"import refused: {exc}", file=sys.stderr)
        return 2
    print(f"imported {len(files)} audio files into {args.dest}")
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from .quality import measure_quality, table, write_report

    simulate = tuple(float(p) for p in args.simulate.split(",")) if args.simulate else None
    if simulate is not None and len(simulate) != 2:
        raise SystemExit("--simulate takes two probabilities, e.g. 0.7,0.5")
    report = measure_quality(args.clips, args.model, args.seed, categories_per_clip=args.categories_per_clip,
                             simulate=simulate, caption_tokens=args.caption_tokens, progress=True)
    write_report(report, args.out)
    print(table(report))
    print(f"\nmodel {report['model']}, {report['clips']} clips, {report['questions']} questions; JSON: {args.out}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .review import stats
    from .store import open_store

    with open_store(args.db) as store:
        print(json.dumps(stats(store), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {"run": cmd_run, "export": cmd_export, "import": cmd_import, "quality": cmd_quality,
                "stats": cmd_stats}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
