"""Eureka-Audio Studio: ``python app.py`` serves the Gradio app on http://127.0.0.1:7860 (the Spaces entry point).

Model: ``--model`` / ``$EUREKA_MODEL`` (a Hub id, a local directory, ``mini``, ``official``, ``tiny-random``).
Without either, the official checkpoint is used when cached or downloadable, otherwise the offline default with a
banner saying so. Host and port follow ``--host``/``--port``, else ``$GRADIO_SERVER_NAME``/``$GRADIO_SERVER_PORT``.

The Review tab reads the DataFlux database ``--db`` / ``$DATAFLUX_DB`` (default ``runs/dataflux.sqlite``). When
reviewers are configured (``$DATAFLUX_REVIEWERS="alice:pw,bob:pw"`` or ``$DATAFLUX_REVIEWERS_FILE``) the app asks
for a login and review decisions are logged under that name; without reviewers the Review tab is read-only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

try:  # ZeroGPU: `spaces` must be imported before torch initialises CUDA
    import spaces  # type: ignore[import-not-found]  # noqa: F401

    # ZeroGPU lends a GPU per call and does not support torch.compile; a CUDA graph captured in one call must not be
    # replayed in another, so decode steps launch eagerly there.
    os.environ.setdefault("EUREKA_CUDA_GRAPHS", "0")
except ImportError:
    pass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Eureka-Audio Studio (Gradio app)")
    parser.add_argument("--model", default=None, help="Hub id, local directory, or preset: mini, official, "
                        "tiny-random (default: $EUREKA_MODEL, else official when reachable, else offline default)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: $EUREKA_DEVICE or auto)")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="default: $EUREKA_DTYPE or auto (bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT or 7860")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="model jobs at once, all tabs and API together (default: $EUREKA_CONCURRENCY or 1)")
    parser.add_argument("--max-queue", type=int, default=None, help="waiting jobs before 'queue full' "
                        "(default: $EUREKA_MAX_QUEUE or 32)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--db", default=None, help="DataFlux database for the Review tab: SQLite path or SQLAlchemy "
                        "URL (default: $DATAFLUX_DB or runs/dataflux.sqlite)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.common import load_app_model, pin_malloc_mmap_threshold
    from app.review import ReviewConfig, auth_options
    from app.ui import build_demo, launch_options
    from model import ModelLoadError

    pin_malloc_mmap_threshold()
    try:
        review_config = ReviewConfig.from_env(args.db)
    except (OSError, ValueError) as exc:  # a malformed $DATAFLUX_REVIEWERS or an unreadable reviewers file
        print(f"error: reviewers: {exc}", file=sys.stderr)
        return 2
    try:
        loaded = load_app_model(args.model, args.device, args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("eureka.app").info("serving %s (%s)", loaded.choice.label, loaded.info)
    demo = build_demo(loaded, concurrency_limit=args.concurrency, max_queue_size=args.max_queue,
                      review_config=review_config)
    logging.getLogger("eureka.app").info("DataFlux database %s; %s", review_config.db_url,
                                         "read-only (no reviewers)" if review_config.read_only else
                                         f"{len(review_config.reviewers.users)} reviewers, login required")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share or None, **launch_options(),
                **auth_options(review_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
