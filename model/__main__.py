"""Command line mirroring the official ``infer.py``: ``python -m model --model SRC --audio PATH --task asr``."""

from __future__ import annotations

import argparse
import json
import sys

from .audio import AudioInputError
from .loading import ModelLoadError, default_source, load_model
from .prompts import TASKS, asr_system_prompt, task_messages
from .tokenizer import encode_plain_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model",
        description="Run Eureka-Audio in process on one clip: speech recognition, audio Q&A or dense captioning.",
    )
    parser.add_argument("--model", default=None, help="preset (mini, tiny-random, official), directory or Hub id "
                        "(default: $EUREKA_MODEL, else the bundled Eureka-mini)")
    parser.add_argument("--audio", required=True, help="audio file (wav, flac, ogg, mp3) or data: URI")
    parser.add_argument("--task", choices=TASKS, default="asr")
    parser.add_argument("--question", help="question for --task qa (default: the official example question)")
    parser.add_argument("--system-prompt", help="replace the task's system prompt ('' for none)")
    parser.add_argument("--language", help="ASR language hint, pinned in the system prompt (e.g. Portuguese)")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repetition-penalty", type=float, default=1.05)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ctc-beams", type=int, help="--task asr: decode N beams and keep the one the model's CTC "
                        "head scores best (default: 6 with a CTC head, as Eureka-mini has; 0 = greedy)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-audio-seconds", type=float, help="refuse longer audio (default 600)")
    parser.add_argument("--routing-json", help="also write the routing trace of the call to this file")
    return parser.parse_args(argv)


def clean_text(text: str | None) -> str | None:
    """Command-line text as valid UTF-8: bytes that are not UTF-8 reach ``sys.argv`` as lone surrogates, which the
    tokenizer cannot encode; they become U+FFFD."""
    return None if text is None else text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def check_text_fits(model, texts: list[str | None], max_new_tokens: int) -> None:
    """Refuse question and system prompt that leave no room in the model's context (a 100 000-character question
    on the byte-level test tokenizer is 100 000 tokens: generating from it would exhaust memory, not answer)."""
    context = int(model.config.backbone.get("max_position_embeddings") or 0)
    used = sum(len(encode_plain_text(model.tokenizer, text)) for text in texts if text)
    if context and used + max_new_tokens > context:
        raise ValueError(f"the question and system prompt are {used} tokens; with --max-new-tokens "
                         f"{max_new_tokens} that exceeds the model's context of {context} tokens. Shorten them.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.question, args.system_prompt, args.language = (
        clean_text(args.question), clean_text(args.system_prompt), clean_text(args.language))
    system_prompt = args.system_prompt
    if system_prompt is None and args.task == "asr" and args.language:
        system_prompt = asr_system_prompt(args.language)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }
    try:
        model = load_model(args.model or default_source(), device=args.device, dtype=args.dtype)
        if args.max_audio_seconds:
            model.config.max_audio_seconds = args.max_audio_seconds
        check_text_fits(model, [args.question, system_prompt], args.max_new_tokens)
        if args.ctc_beams is not None:
            if args.ctc_beams > 1 and args.task != "asr":
                raise ValueError("--ctc-beams re-ranks transcriptions: it applies to --task asr only")
            settings["ctc_beams"] = args.ctc_beams
        elif args.task == "asr" and args.temperature == 0:
            settings["ctc_beams"] = model.asr_ctc_beams
        messages = task_messages(args.task, args.audio, args.question, system_prompt)
        if args.stream:
            for piece in model.stream(messages, **settings):
                print(piece, end="", flush=True)
            print()
        else:
            print(model.generate(messages, **settings))
    except (AudioInputError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.routing_json and model.last_routing is not None:
        with open(args.routing_json, "w") as handle:
            json.dump(model.last_routing.to_dict(), handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
