"""Export verified samples as training records: JSONL for ``model/train.py --extra-records``, or a datasets folder.

A record is ``{"task": "qa", "messages": [user turn: audio_url (absolute path) + question], "target": "X. option",
...}`` — the chat layout ``model.train.read_records`` / ``make_example`` consume, plus provenance fields (clip hash,
category, sample id) that the trainer ignores.

Which samples: ``kept`` = the judge kept them and no reviewer rejected or flagged them (an edit's answer wins);
``accepted`` = a reviewer accepted or edited them.

``hf`` writes a folder that ``datasets.load_dataset("parquet", data_dir=...)`` (or plain pyarrow) reads:
``data/train-00000-of-00001.parquet`` with the messages as nested columns, plus ``dataset_info.json`` and a copy of
the records as ``records.jsonl``. We chose parquet + JSON over depending on ``datasets`` itself (a heavy install
the app does not otherwise need); ``pyarrow`` comes with ``ray[data]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from .models import Question, Sample
from .store import Store

EXPORT_STATUSES = ("accepted", "kept")
FORMATS = ("jsonl", "hf")


def selected_samples(store: Store, status: str) -> list[Sample]:
    """Samples to export, with question, clip and category loaded."""
    if status not in EXPORT_STATUSES:
        raise ValueError(f"unknown status {status!r}; expected one of {', '.join(EXPORT_STATUSES)}")
    query = (select(Sample).options(selectinload(Sample.question).selectinload(Question.clip),
                                    selectinload(Sample.question).selectinload(Question.category))
             .where(Sample.target.is_not(None)).order_by(Sample.id))
    if status == "accepted":
        query = query.where(Sample.status.in_(("accepted", "edited")))
    else:
        query = query.where(Sample.judge_keep.is_(True), Sample.status.not_in(("rejected", "flagged")))
    with store.session() as session:
        return list(session.scalars(query))


def record(sample: Sample) -> dict[str, Any]:
    """One training record in the model's chat layout."""
    question = sample.question
    user = {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": str(Path(question.clip.path))}},
                                        {"type": "text", "text": question.text}]}
    return {"task": "qa", "messages": [user], "target": sample.target, "clip_id": question.clip.sha256[:16],
            "question_kind": question.category.key, "category": question.category.path, "sample_id": sample.id,
            "status": sample.status}


def export(store: Store, status: str, fmt: str, out: str | os.PathLike) -> int:
    """Write the selected samples to ``out`` (a .jsonl file, or a folder for ``hf``); returns how many."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    records = [record(s) for s in selected_samples(store, status)]
    out = Path(out)
    if fmt == "jsonl":
        write_jsonl(records, out)
    else:
        write_hf(records, out, status)
    return len(records)


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for item in records:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def write_hf(records: list[dict[str, Any]], folder: Path, status: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=hf_schema())
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    write_jsonl(records, folder / "records.jsonl")
    info = {
        "description": f"Eureka-Audio Studio DataFlux export ({status} samples): audio multiple-choice QA in the "
                       "official chat layout; audio_url holds absolute paths on the exporting machine.",
        "features": {name: str(table.schema.field(name).type) for name in table.schema.names},
        "splits": {"train": {"name": "train", "num_examples": len(records)}},
        "format": "parquet",
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def hf_schema():
    """Explicit nested schema (inference would fail on an empty export)."""
    import pyarrow as pa

    item = pa.struct([("type", pa.string()), ("text", pa.string()),
                      ("audio_url", pa.struct([("url", pa.string())]))])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(item))])
    return pa.schema([("task", pa.string()), ("messages", pa.list_(message)), ("target", pa.string()),
                      ("clip_id", pa.string()), ("question_kind", pa.string()), ("category", pa.string()),
                      ("sample_id", pa.int64()), ("status", pa.string())])
