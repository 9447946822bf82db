"""Parity check: our native implementation against the checkpoint's own ``trust_remote_code`` model.

    python -m model.parity DIR [--audio PATH] [--task asr|qa|caption] [--max-new-tokens N] [--dtype float32] [--json]

Loads ``DIR`` twice, with ``load_model`` and with ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)``, builds one prompt (our tokenizer layout and official log-mels), then

1. runs one forward pass through both and reports the largest absolute logit difference over the prompt;
2. decodes greedily with both (native ``EurekaAudio.generate``; remote ``generate`` with the official wrapper's
   keyword arguments) and reports whether the texts match.

Exit status: 0 when the difference is within ``--tolerance`` and the texts match, 1 when not, 2 when the check
cannot run (no remote code in ``DIR``, a load failure, unreadable audio).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio import FRAMES_PER_TOKEN, SAMPLE_RATE, AudioInputError, chunk_log_mel
from .inference import EurekaAudio, GenerationSettings
from .loading import ModelLoadError, load_model
from .prompts import TASKS, task_messages

# Half precisions round differently in the two implementations (our encoder norms stay float32, the remote
# adapter norm computes in float32): their defaults are rough bounds for logits of magnitude ~10–30.
DEFAULT_TOLERANCE = {"float32": 1e-3, "float64": 1e-6, "bfloat16": 5e-1, "float16": 1e-1}


class ParityError(RuntimeError):
    """The check cannot run at all (exit status 2); the message says why."""


@dataclass
class ParityResult:
    """What one parity run measured."""

    directory: str
    task: str
    dtype: str
    device: str
    prompt_tokens: int
    audio_tokens: int
    max_abs_logit_diff: float
    max_abs_logit: float
    tolerance: float
    logits_match: bool
    native_text: str
    remote_text: str
    texts_match: bool
    max_new_tokens: int
    repetition_penalty: float

    @property
    def passed(self) -> bool:
        return self.logits_match and self.texts_match

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def builtin_clip(seconds: float = 3.0, seed: int = 0) -> tuple[np.ndarray, int]:
    """A deterministic test clip: an A-major chord with a slow tremolo and a little noise, at 16 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) / 3
    tremolo = 0.75 + 0.25 * np.sin(2 * np.pi * 3.0 * t)
    noise = np.random.default_rng(seed).standard_normal(t.shape)
    return (0.4 * chord * tremolo + 0.01 * noise).astype(np.float32), SAMPLE_RATE


def check_remote_code(directory: Path) -> None:
    """Raise :class:`ParityError` unless ``directory`` holds a config with ``auto_map`` and the files it names."""
    if not directory.is_dir():
        raise ParityError(f"{directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ParityError(f"{directory} has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ParityError(f"{config_path} is not valid JSON: {exc}") from None
    target = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if not target:
        raise ParityError(
            f"{directory} has no remote code: config.json lacks auto_map.AutoModelForCausalLM, so there is no "
            "reference implementation to compare with (the official checkpoint ships modeling_eureka_audio.py)"
        )
    refs = [r for v in config["auto_map"].values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    names = {ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs}
    missing = sorted(name for name in names if not (directory / name).is_file())
    if missing:
        raise ParityError(f"{directory} lacks the remote code its config.json names: {', '.join(missing)}")


def load_remote(directory: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The checkpoint's own implementation, as the official wrapper loads it."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype)
    except Exception as exc:  # any failure inside third-party remote code means the check cannot run
        raise ParityError(f"the remote code in {directory} failed to load: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval()


def _native_generate(native: EurekaAudio, messages: list[dict[str, Any]], max_new_tokens: int, penalty: float) -> str:
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=penalty)
    return str(native.generate(messages, settings))


@torch.inference_mode()
def run_parity(
    directory: str | Path,
    audio: str | None = None,
    task: str = "asr",
    max_new_tokens: int = 32,
    dtype: str = "float32",
    tolerance: float | None = None,
    device: str = "cpu",
) -> ParityResult:
    """Load both implementations, compare their prompt logits and their greedy outputs."""
    directory = Path(directory)
    check_remote_code(directory)
    torch_dtype = getattr(torch, dtype)
    tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-3) if tolerance is None else tolerance
    try:
        native = load_model(directory, device=device, dtype=torch_dtype)
    except ModelLoadError as exc:
        raise ParityError(f"native loading failed: {exc}") from exc
    remote = load_remote(directory, torch_dtype, device)

    messages = task_messages(task, audio if audio is not None else builtin_clip())
    prompt, clips = native.tokenize(messages)
    input_ids = torch.tensor([prompt.input_ids], device=device)
    token_type_ids = torch.tensor([prompt.token_type_ids], device=device)
    log_mel = torch.cat([clip.log_mel for clip in clips], dim=-1)
    mel_chunks = chunk_log_mel(log_mel).to(device)
    n_audio = log_mel.shape[-1] // FRAMES_PER_TOKEN

    native_logits = native.model(input_ids, native.special_ids.audio_pad, mel_chunks, n_audio).logits
    remote_logits = remote(
        input_ids=input_ids, token_type_ids=token_type_ids, mel_batch_list=mel_chunks.to(torch_dtype)
    ).logits
    diff = float((native_logits.float() - remote_logits.float()).abs().max())

    # The official wrapper's call; the checkpoint's generation_config.json supplies the rest (repetition penalty).
    penalty = float(getattr(remote.generation_config, "repetition_penalty", None) or 1.0)
    ids = native.special_ids
    output = remote.generate(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        audio_input_ids=None,
        mel_batch_list=mel_chunks.to(torch_dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=ids.im_end,
        pad_token_id=ids.pad,
        use_cache=True,
    )
    remote_text = native.tokenizer.decode(output[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True)
    native_text = _native_generate(native, messages, max_new_tokens, penalty)
    return ParityResult(
        directory=str(directory),
        task=task,
        dtype=dtype,
        device=device,
        prompt_tokens=input_ids.shape[1],
        audio_tokens=n_audio,
        max_abs_logit_diff=diff,
        max_abs_logit=float(native_logits.float().abs().max()),
        tolerance=tolerance,
        logits_match=diff <= tolerance,
        native_text=native_text,
        remote_text=remote_text,
        texts_match=native_text == remote_text,
        max_new_tokens=max_new_tokens,
        repetition_penalty=penalty,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.parity",
        description="Compare our Eureka-Audio implementation with a checkpoint's own trust_remote_code model.",
    )
    parser.add_argument("directory", help="checkpoint directory in the official layout, with its remote code")
    parser.add_argument("--audio", help="audio file (default: a built-in 3 s chord with a little noise)")
    parser.add_argument("--task", choices=TASKS, default="asr")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DEFAULT_TOLERANCE), default="float32")
    parser.add_argument("--tolerance", type=float, help="largest allowed logit difference (default: 1e-3 in float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        result = run_parity(
            args.directory, args.audio, args.task, args.max_new_tokens, args.dtype, args.tolerance, args.device
        )
    except (ParityError, AudioInputError) as exc:
        if args.json:
            print(json.dumps({"directory": args.directory, "error": str(exc), "passed": False}))
        print(f"parity check cannot run: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"checkpoint      {result.directory} ({result.dtype}, {result.device}, task {result.task})")
        print(f"prompt          {result.prompt_tokens} tokens, {result.audio_tokens} audio")
        verdict = "ok" if result.logits_match else "TOO LARGE"
        print(f"max |Δ logit|   {result.max_abs_logit_diff:.3e} (tolerance {result.tolerance:.1e}: {verdict}; "
              f"largest |logit| {result.max_abs_logit:.3g})")
        print(f"native greedy   {result.native_text!r}")
        print(f"remote greedy   {result.remote_text!r}")
        print(f"greedy outputs  {'match' if result.texts_match else 'DIFFER'}")
        print("PASS" if result.passed else "FAIL")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
