"""The example clips (``assets/examples``, made by ``app/make_examples.py``) as rows for each tab's ``gr.Examples``.

Every example carries its task prompt: the ASR system prompt with its language pinned, a Q&A question (most are
multiple choice with a known answer), the caption prompt. A missing manifest just means no examples, not a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MANIFEST = EXAMPLES_DIR / "examples.json"


def load_manifest(manifest: Path = MANIFEST) -> list[dict[str, Any]]:
    """Manifest entries whose clip exists, each with an absolute ``path``."""
    if not manifest.is_file():
        return []
    entries = []
    for entry in json.loads(manifest.read_text()):
        path = manifest.parent / entry["file"]
        if path.is_file():
            entries.append({**entry, "path": str(path)})
    return entries


def tab_examples(task: str, manifest: Path = MANIFEST) -> tuple[list[list[Any]], list[str]]:
    """Rows and labels for one tab: ``asr`` (speech clips + system prompt), ``qa`` (clip + question),
    ``caption`` (clip + caption prompt), ``routing`` (clip only)."""
    rows, labels = [], []
    for entry in load_manifest(manifest):
        if task == "asr":
            if not entry.get("language"):
                continue  # transcribing a melody says nothing
            rows.append([entry["path"], entry["asr_system_prompt"]])
        elif task == "qa":
            rows.append([entry["path"], entry["qa_question"]])
        elif task == "caption":
            rows.append([entry["path"], entry["caption_prompt"]])
        elif task == "routing":
            rows.append([entry["path"]])
        else:
            raise ValueError(f"unknown tab {task!r}")
        labels.append(entry["title"])
    return rows, labels
