"""``python -m model.parity``: native implementation vs the checkpoint's own remote code (test fixture copy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from official_checkpoint import small_model, write_official_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run_parity(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; remote code is cached under tmp_path, not in the user's ~/.cache."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
    }
    return subprocess.run(
        [sys.executable, "-m", "model.parity", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("style", "task"),
    [("plain", "asr"), pytest.param("gated", "qa", marks=pytest.mark.slow)],
)
def test_native_matches_remote_code(tmp_path, style, task) -> None:
    model = small_model(gated=style == "gated", top_k=3 if style == "gated" else 2, norm_topk_prob=style == "plain")
    directory = write_official_checkpoint(model, tmp_path / "checkpoint", adapter_style=style)
    result = run_parity(tmp_path, str(directory), "--json", "--task", task, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["passed"] and summary["texts_match"]
    assert summary["max_abs_logit_diff"] <= 1e-4
    assert summary["native_text"] == summary["remote_text"] != ""
    assert summary["audio_tokens"] == 38  # the built-in 3 s clip: ceil(48000 / 1280)


def test_a_diverging_implementation_fails(tmp_path) -> None:
    """Break the remote code's top-k renormalisation: the check must notice (exit 1)."""
    directory = write_official_checkpoint(small_model(), tmp_path / "checkpoint")
    modeling = directory / "modeling_eureka_audio.py"
    source = modeling.read_text()
    renormalise = "top_w = top_w / top_w.sum(dim=-1, keepdim=True)"
    assert renormalise in source
    modeling.write_text(source.replace(renormalise, "pass"))
    result = run_parity(tmp_path, str(directory), "--json", "--max-new-tokens", "4")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert not summary["logits_match"] and summary["max_abs_logit_diff"] > 1e-3


def test_directory_without_remote_code_exits_2(tmp_path, capsys) -> None:
    """In-process (no remote code is ever imported): exit 2 with a message that says what is missing."""
    from model.parity import main

    bare = write_official_checkpoint(small_model(), tmp_path / "bare", remote_code=False)
    config = json.loads((bare / "config.json").read_text())
    del config["auto_map"]
    (bare / "config.json").write_text(json.dumps(config))
    assert main([str(bare)]) == 2
    assert "no remote code" in capsys.readouterr().err

    # auto_map present but the files it names are missing (remote_code=False keeps auto_map).
    missing = write_official_checkpoint(small_model(), tmp_path / "missing", remote_code=False)
    assert main([str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert "modeling_eureka_audio.py" in captured.err
    assert json.loads(captured.out)["passed"] is False

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
