"""Review tab (DataFlux): a queue of judged samples, one sample in full, accept / reject / edit / flag, statistics,
and new runs on uploaded clips.

The tab is thin over ``dataflux_ui.review``: filtering, paging, versioned writes, bulk accept and statistics live
there as plain functions; this module turns component values into their arguments and their results into text.

Three rules shape it:

* **Who wrote it.** Every write takes the reviewer from the logged-in Gradio user (``gr.Request.username``) and checks
  it server-side against the configured reviewers, in every write callback, before anything else — hiding a button
  or an API endpoint is not access control. Without configured reviewers the tab is read-only and says so.
* **No silent overwrite.** The version a reviewer loaded stays in a ``gr.State``; a write names it, and a sample
  someone changed meanwhile raises ``ConflictError``, shown as a warning while the sample is reloaded.
* **Database text is text.** Captions, questions, answers, reasoning and comments come from models and people; they
  are only ever put into Textboxes, Dataframe ``str`` cells or (escaped) plotly titles, never into HTML or Markdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sqlalchemy import select

from dataflux_ui import review as df_review
from dataflux_ui.auth import ENV_FILE, ENV_USERS, AuthError, Reviewers
from dataflux_ui.importer import ImportRefused, import_folder, import_zip
from dataflux_ui.models import CONSISTENCY, SAMPLE_STATUSES, WINNERS, AuditEntry, Category, Question, Sample
from dataflux_ui.pipeline import (
    AUDIO_EXTENSIONS,
    Components,
    PipelineConfig,
    clear_error,
    finish_run,
    ingest,
    process_clip,
    record_error,
    start_run,
    sync_categories,
)
from dataflux_ui.store import Store, audit, open_store
from model.audio import SAMPLE_RATE, AudioInputError, load_audio, log_mel_spectrogram

from .common import AppContext, env_int, gpu
from .routing import pool_columns

log = logging.getLogger("eureka.app.review")

DEFAULT_DB = "runs/dataflux.sqlite"
DEFAULT_UPLOADS = "runs/uploads"
PAGE_SIZE = 12
ANY = "any"
AGREEMENT_CHOICES = (ANY, "agree", "disagree")
JUDGE_CHOICES = (ANY, "keep", "discard", *WINNERS)
ACTIONS = ("accept", "reject", "edit", "flag")
QUEUE_HEADERS = ["id", "status", "judge", "A/B", "category", "question"]
QUEUE_WIDTHS = ["6%", "15%", "13%", "8%", "19%", "39%"]
WINNER_SHORT = {"MODEL_A": "A", "MODEL_B": "B", "TIE": "tie", "NONE": ""}
AUDIT_HEADERS = ["time (UTC)", "who", "action", "status", "comment / answer", "versions"]
AUDIT_WIDTHS = ["19%", "10%", "20%", "14%", "27%", "10%"]
RETENTION_HEADERS = ["category", "samples", "judge kept", "retention", "accepted", "rejected"]
ACCURACY_HEADERS = ["answerer", "accepted samples", "correct", "accuracy"]
MAX_SPECTROGRAM_COLUMNS = 600

# Keyboard shortcuts: one document-level listener, added once through ``launch(head=...)``. It clicks the tab's
# buttons (so a shortcut does exactly what the button does, checks included), only while the Review tab is shown,
# never while the reviewer types in a text field, and never with a modifier key (Ctrl+R stays "reload").
SHORTCUTS_HEAD = """
<script>
(() => {
  const KEYS = {a: "review-accept", r: "review-reject", f: "review-flag", j: "review-next", k: "review-prev"};
  const TYPING = new Set(["text", "search", "number", "password", "email", "url", "tel"]);
  function typing(node) {
    if (!node) return false;
    if (node.isContentEditable || node.tagName === "TEXTAREA" || node.tagName === "SELECT") return true;
    return node.tagName === "INPUT" && TYPING.has((node.type || "text").toLowerCase());
  }
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || event.defaultPrevented) return;
    const id = KEYS[event.key];
    if (!id || typing(event.composedPath()[0] || event.target)) return;
    const found = document.getElementById(id);
    const button = found && (found.tagName === "BUTTON" ? found : found.querySelector("button"));
    if (!button || button.disabled || button.offsetParent === null) return;  // tab hidden or read-only
    event.preventDefault();
    if (id === "review-flag") {
      const comment = document.querySelector("#review-comment textarea");
      if (comment && !comment.value.trim()) { comment.focus(); return; }  // a flag needs a reason: type it first
    }
    button.click();
  });
})();
</script>
"""

HELP = """\
**Keyboard:** `a` accept · `r` reject · `f` flag (type the comment first; `f` with an empty comment jumps to it) ·
`j` / `k` next / previous sample in the queue. Shortcuts are off while you type in a text field.
A decision is saved against the version you loaded: if another reviewer changed the sample meanwhile, nothing is
saved and the sample is reloaded so you can decide again.
"""


# --- configuration ------------------------------------------------------------------------------------------------
@dataclass
class ReviewConfig:
    """Where the DataFlux database is, who may write to it, and where uploads go; the store opens on first use.

    Opening lazily keeps the rest of the app serving when the database is missing or unreachable: the Review tab
    shows the error instead of the whole app failing to start.
    """

    db_url: str = DEFAULT_DB
    reviewers: Reviewers = field(default_factory=Reviewers)
    uploads_dir: Path = Path(DEFAULT_UPLOADS)
    max_upload_bytes: int = 1024 * 1024**2
    max_upload_files: int = 500
    _store: Store | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls, db: str | None = None, reviewers: Reviewers | None = None) -> ReviewConfig:
        """``db`` (``--db``), else ``$DATAFLUX_DB``, else ``runs/dataflux.sqlite``; reviewers from
        ``$DATAFLUX_REVIEWERS`` / ``$DATAFLUX_REVIEWERS_FILE``; uploads under ``$DATAFLUX_UPLOADS`` with limits
        ``$DATAFLUX_UPLOAD_MAX_MB`` (1024) and ``$DATAFLUX_UPLOAD_MAX_FILES`` (500)."""
        return cls(
            db_url=db or os.environ.get("DATAFLUX_DB") or DEFAULT_DB,
            reviewers=reviewers if reviewers is not None else Reviewers.from_env(),
            uploads_dir=Path(os.environ.get("DATAFLUX_UPLOADS") or DEFAULT_UPLOADS),
            max_upload_bytes=max(1, env_int("DATAFLUX_UPLOAD_MAX_MB", 1024)) * 1024**2,
            max_upload_files=max(1, env_int("DATAFLUX_UPLOAD_MAX_FILES", 500)),
        )

    @property
    def read_only(self) -> bool:
        return not self.reviewers.users

    def store(self) -> Store:
        """The shared store (opened and migrated once); a ``gr.Error`` naming the database when that fails."""
        with self._lock:
            if self._store is None:
                try:
                    self._store = open_store(self.db_url)
                except Exception as exc:  # bad URL, unreachable server, unwritable folder: say which database
                    log.exception("opening the DataFlux database %s failed", self.db_url)
                    raise gr.Error(f"Could not open the DataFlux database {self.db_url}: {exc}") from None
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def auth_options(config: ReviewConfig) -> dict[str, Any]:
    """``launch()`` arguments: Gradio login when reviewers are configured (then the whole app needs a login, which
    also closes the HTTP API to anonymous callers), nothing otherwise (the Review tab is then read-only)."""
    if config.read_only:
        return {}
    return {"auth": config.reviewers, "auth_message": "Eureka-Audio Studio: sign in with your DataFlux reviewer "
                                                      "name and password."}


def access_note(config: ReviewConfig, username: str | None) -> str:
    """The line above the queue: who is writing, or why nobody can."""
    if config.read_only:
        return (f"**Read-only.** No reviewers are configured, so nobody can accept, reject, edit or flag. Start the "
                f"app with `{ENV_USERS}=name:password,…` (or `{ENV_FILE}=path`) and sign in to review.")
    if username and username in config.reviewers.users:
        return f"Signed in as reviewer **{_md_code(username)}**: every decision is logged under this name."
    return "**Not signed in as a reviewer**: decisions are refused. Sign in with a reviewer account."


def _md_code(text: str) -> str:
    """A user name inside Markdown, shown literally (names come from the reviewers file, but stay careful)."""
    return "`" + text.replace("`", "'") + "`"


def require_reviewer(config: ReviewConfig, username: str | None) -> str:
    """The server-side gate of every write: the logged-in user must be a configured reviewer."""
    if config.read_only:
        raise gr.Error(f"Read-only: no reviewers are configured ({ENV_USERS} / {ENV_FILE}), so nothing can be "
                       "changed.")
    try:
        return config.reviewers.require(username)
    except AuthError:
        raise gr.Error("Only a signed-in reviewer can change samples; sign in with a reviewer account.") from None


def request_user(request: Any) -> str | None:
    """The logged-in name Gradio attached to the request (``None`` when there is no login)."""
    return getattr(request, "username", None) if request is not None else None


# --- the queue ----------------------------------------------------------------------------------------------------
def make_filter(status: str | None = ANY, category: str | None = ANY, judge: str | None = ANY,
                consistency: str | None = ANY, agreement: str | None = ANY,
                text: str | None = "") -> df_review.SampleFilter:
    """Dropdown values → ``SampleFilter``; ``any`` (or empty) means no condition."""
    def pick(value: str | None) -> str | None:
        return None if value in (None, "", ANY) else value

    agree = pick(agreement)
    return df_review.SampleFilter(
        status=pick(status), category=pick(category), judge=pick(judge), consistency=pick(consistency),
        agreement=None if agree is None else agree == "agree", text=(text or "").strip() or None,
    )


def _one_line(text: str | None, limit: int = 90) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def queue_rows(page: df_review.Page) -> pd.DataFrame:
    """The queue table: one row per sample — judge outcome as "KEEP A" (winner) or "DISCARD", both answerers'
    letters, the category's leaf and the question stem on one line (everything, in full, is in the sample panel)."""
    rows = [[s.id, s.status, "" if s.final_action is None else
             f"{'KEEP' if s.final_action.startswith('KEEP') else 'DISCARD'} {WINNER_SHORT.get(s.winner or '', '')}"
             .strip(), f"{s.answer_a or '–'}/{s.answer_b or '–'}", s.category.split(" > ")[-1],
             _one_line(s.question.split("\n", 1)[0])]
            for s in page.items]
    return pd.DataFrame(rows, columns=QUEUE_HEADERS)


def load_queue(store: Store, flt: df_review.SampleFilter, page: int = 1,
               page_size: int = PAGE_SIZE) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """One page of the queue (the page number clamped to what exists), its state for ``j``/``k``, and a summary."""
    try:
        result = df_review.list_samples(store, flt, max(1, int(page)), page_size)
        if result.items == [] and result.total and page > result.pages:
            result = df_review.list_samples(store, flt, result.pages, page_size)
    except ValueError as exc:
        raise gr.Error(f"Bad filter: {exc}") from None
    state = {"filter": dict(flt.__dict__), "page": result.page, "pages": result.pages,
             "ids": [item.id for item in result.items]}
    info = f"page {result.page} of {result.pages} · {result.total} sample{'s' if result.total != 1 else ''}"
    return queue_rows(result), state, info


def neighbour(store: Store, queue: dict[str, Any], current: int | None, step: int,
              page_size: int = PAGE_SIZE) -> tuple[int | None, pd.DataFrame | None, dict[str, Any], str | None]:
    """The sample ``step`` (+1 ``j`` / −1 ``k``) away from ``current`` in the queue, moving across pages.

    Returns the id (``None`` at either end) and, when the page changed, the new page's table, state and summary.
    """
    ids = list(queue.get("ids") or [])
    if not ids:
        return None, None, queue, None
    position = ids.index(current) if current in ids else (-1 if step > 0 else len(ids))
    target = position + step
    if 0 <= target < len(ids):
        return ids[target], None, queue, None
    page = int(queue.get("page", 1)) + (1 if target >= len(ids) else -1)
    if page < 1 or page > int(queue.get("pages", 1)):
        return None, None, queue, None
    table, state, info = load_queue(store, df_review.SampleFilter(**queue["filter"]), page, page_size)
    if not state["ids"]:
        return None, None, queue, None
    return (state["ids"][0] if step > 0 else state["ids"][-1]), table, state, info


def category_choices(store: Store) -> list[str]:
    """Category paths that have samples, for the category filter."""
    with store.session() as session:
        paths = session.scalars(select(Category.path).join(Question, Question.category_id == Category.id)
                                .join(Sample, Sample.question_id == Question.id).distinct()).all()
    return [ANY, *sorted(paths)]


# --- one sample ---------------------------------------------------------------------------------------------------
@dataclass
class SamplePanel:
    """Everything the sample area shows, as plain text (never markup)."""

    id: int
    version: int
    status: str
    header: str
    caption: str
    question: str
    answers: list[str]  # Model A, Model B: answerer, choice and response
    reasoning: list[str]  # Model A, Model B: the THINK/RESPONSE form plus the raw reply
    verdict: str
    options: list[str]  # "A. text" … for the edit control
    target: str | None
    clip_path: str
    audit: pd.DataFrame


def sample_panel(store: Store, sample_id: int) -> SamplePanel:
    """One sample, formatted for the tab; ``gr.Error`` when there is no such sample."""
    try:
        detail = df_review.get_sample(store, int(sample_id))
    except (df_review.NotFoundError, TypeError, ValueError):
        raise gr.Error(f"There is no sample {sample_id}.") from None
    verdict = detail.verdict
    judge = "not judged yet" if verdict is None else (
        f"judge {'KEEP' if detail.judge_keep else 'DISCARD'} ({verdict['winner']})")
    header = (f"Sample {detail.id} · status {detail.status} · version {detail.version} · {judge} · "
              f"target {detail.target or '—'} · {detail.category} · clip {Path(detail.clip_path).name} "
              f"({detail.duration_s:.1f} s)")
    options = [f"{letter}. {text}" for letter, text in zip("ABCD", detail.options, strict=False)]
    question = detail.question + (f"\n\nGenerator's key: {detail.correct_option}" if detail.correct_option else "")
    answers, reasoning = [], []
    for slot in ("A", "B"):
        answer = next((a for a in detail.answers if a["slot"] == slot), None)
        if answer is None:
            answers.append(f"Model {slot}: no answer yet")
            reasoning.append("")
            continue
        answers.append(f"Model {slot} ({answer['answerer']}) chose {answer['chosen_option'] or 'nothing readable'}"
                       f"\n{answer['response'] or '(no option could be read from the reply)'}")
        reasoning.append(f"{answer['formatted']}\n\nRaw reply:\n{answer['raw_text']}")
    verdict_text = "No verdict yet." if verdict is None else (
        f"{verdict['final_action']} · winner {verdict['winner']} · consistency with caption "
        f"{verdict['consistency_with_caption']} · consensus {'yes' if verdict['consensus'] else 'no'} · judge "
        f"{verdict['judge']}\n\n{verdict['reasoning']}")
    return SamplePanel(detail.id, detail.version, detail.status, header, detail.caption, question, answers, reasoning,
                       verdict_text, options, detail.target, detail.clip_path, sample_audit(store, detail.id))


def sample_audit(store: Store, sample_id: int) -> pd.DataFrame:
    """This sample's audit entries, newest first: who did what, the comment or edited answer, the versions."""
    with store.session() as session:
        entries = session.scalars(select(AuditEntry).where(AuditEntry.entity == "sample",
                                                           AuditEntry.entity_id == sample_id)
                                  .order_by(AuditEntry.id.desc()).limit(50)).all()
    rows = []
    for entry in entries:
        detail = entry.detail or {}
        note = " · ".join(str(v) for v in (detail.get("target") if entry.action == "review_edit" else None,
                                           detail.get("comment")) if v)
        versions = (f"{detail['from_version']} → {detail['to_version']}"
                    if "from_version" in detail and "to_version" in detail else "")
        rows.append([entry.at.strftime("%Y-%m-%d %H:%M:%S"), entry.actor, entry.action, detail.get("status", ""),
                     note, versions])
    return pd.DataFrame(rows, columns=AUDIT_HEADERS)


def clip_audio(path: str) -> tuple[tuple[int, np.ndarray] | None, go.Figure | None, str]:
    """The clip for the player (16 kHz mono 16-bit, what the models heard) and its log-mel spectrogram.

    Samples rather than the path: the player then works wherever the clips live, without widening the folders
    Gradio may serve. A missing or unreadable clip gives a note instead (the review still works from the text).
    """
    try:
        samples = load_audio(path)
    except AudioInputError as exc:
        return None, None, f" · audio unavailable: {exc}".replace(str(Path(path).parent) + os.sep, "")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)  # what Gradio would convert to, minus its warning
    return (SAMPLE_RATE, pcm), spectrogram_figure(samples), ""


def spectrogram_figure(samples: np.ndarray) -> go.Figure:
    """Log-mel spectrogram (80 bands, the model's front-end), pooled to at most 600 columns for the browser."""
    mel, factor = pool_columns(log_mel_spectrogram(samples, 80).float().numpy(), MAX_SPECTROGRAM_COLUMNS)
    times = (np.arange(mel.shape[1]) + 0.5) * factor * 160 / SAMPLE_RATE
    figure = go.Figure(go.Heatmap(z=mel, x=times, colorscale="Viridis", showscale=False,
                                  hovertemplate="t=%{x:.2f}s mel band %{y}<extra></extra>"))
    figure.update_layout(height=220, margin={"l": 40, "r": 10, "t": 10, "b": 35}, xaxis_title="time (s)",
                         yaxis_title="mel band")
    return figure


# --- writing ------------------------------------------------------------------------------------------------------
def perform(config: ReviewConfig, username: str | None, loaded: dict[str, Any] | None, action: str,
            answer: str | None = None, comment: str | None = None) -> str:
    """Run one review action on the loaded sample at the loaded version; returns what happened, in words.

    Order matters: the reviewer check comes first, so an anonymous call learns nothing and changes nothing.
    ``ConflictError`` passes through (the caller warns and reloads); other refusals become ``gr.Error``.
    """
    reviewer = require_reviewer(config, username)
    if action not in ACTIONS:
        raise gr.Error(f"Unknown action {action!r}.")
    if not loaded or loaded.get("id") is None:
        raise gr.Error("No sample is loaded: pick one in the queue first.")
    sample_id, version = int(loaded["id"]), int(loaded["version"])
    comment = (comment or "").strip() or None
    store = config.store()
    try:
        if action == "accept":
            new_version = df_review.accept(store, sample_id, reviewer, version, comment, reviewers=config.reviewers)
        elif action == "reject":
            new_version = df_review.reject(store, sample_id, reviewer, version, comment, reviewers=config.reviewers)
        elif action == "edit":
            if not (answer or "").strip():
                raise gr.Error("Pick the right answer (A–D) before saving an edit.")
            new_version = df_review.edit(store, sample_id, reviewer, version, answer or "", comment,
                                         reviewers=config.reviewers)
        else:
            if not comment:
                raise gr.Error("Flagging needs a comment saying what is wrong: type it, then flag.")
            new_version = df_review.flag(store, sample_id, reviewer, version, comment, reviewers=config.reviewers)
    except (df_review.NotFoundError, ValueError, AuthError) as exc:
        raise gr.Error(str(exc)) from None
    past = {"accept": "accepted", "reject": "rejected", "edit": "edited", "flag": "flagged"}[action]
    return f"Sample {sample_id} {past} by {reviewer} (version {version} → {new_version})."


def bulk_accept(config: ReviewConfig, username: str | None, flt: df_review.SampleFilter) -> str:
    """Accept every pending judge-KEEP sample in the filter (each at the version read; changed ones skipped)."""
    reviewer = require_reviewer(config, username)
    try:
        result = df_review.bulk_accept_kept(config.store(), reviewer, flt, reviewers=config.reviewers)
    except (ValueError, AuthError) as exc:
        raise gr.Error(str(exc)) from None
    skipped = f"; {result['skipped']} changed meanwhile and were skipped" if result["skipped"] else ""
    return f"Bulk accept by {reviewer}: {result['accepted']} pending judge-KEEP samples accepted{skipped}."


# --- statistics ---------------------------------------------------------------------------------------------------
def stats_tables(store: Store) -> tuple[pd.DataFrame, str, pd.DataFrame]:
    """Retention by category, judge-vs-human agreement with Cohen's kappa, each answerer's accuracy on accepted
    samples — as two tables and a sentence."""
    numbers = df_review.stats(store)
    retention = pd.DataFrame(
        [[path, e["samples"], e["judge_kept"], f"{100 * e['retention']:.1f} %", e["accepted"], e["rejected"]]
         for path, e in numbers["retention"].items()], columns=RETENTION_HEADERS)
    agreement = numbers["judge_vs_human"]
    if agreement["reviewed"]:
        kappa = "undefined (one side never varies)" if agreement["cohen_kappa"] is None else \
            f"{agreement['cohen_kappa']:.3f}"
        summary = (f"Judge vs. human on {agreement['reviewed']} reviewed samples (accepted/edited = keep, rejected "
                   f"= discard): agreement {100 * agreement['agreement']:.1f} %, Cohen's kappa {kappa}.")
    else:
        summary = "No sample has been accepted, edited or rejected yet: judge-vs-human agreement is not defined."
    accuracy = pd.DataFrame([[name, e["n"], e["correct"], f"{100 * e['accuracy']:.1f} %"]
                             for name, e in sorted(numbers["answerer_accuracy"].items())], columns=ACCURACY_HEADERS)
    return retention, summary, accuracy


# --- new runs from uploads ----------------------------------------------------------------------------------------
def _file_path(value: Any) -> Path:
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    return Path(getattr(value, "path", None) or getattr(value, "name", None) or value) \
        if not isinstance(value, (str, os.PathLike)) else Path(value)


def _megabytes(count: int) -> str:
    return f"{count / 1024**2:.1f} MB"


def import_upload(files: list[Any], destination: Path, max_bytes: int, max_files: int) -> list[Path]:
    """Bring uploaded audio files and zips into ``destination`` through ``dataflux_ui.importer``.

    Zips go to ``destination/<zip name>/`` via ``import_zip`` (which refuses ``..``, absolute names, escaping symlinks
    and entries inflating beyond their size); loose audio files are staged under their base names and imported with
    ``import_folder``. Sizes are checked before anything is written. Any refusal removes ``destination`` again, so
    an upload is wholly imported or not at all.
    """
    paths = [_file_path(f) for f in files or [] if f]
    if not paths:
        raise gr.Error("Upload audio files or a .zip of audio first.")
    unknown = [p.name for p in paths if p.suffix.lower() not in AUDIO_EXTENSIONS and p.suffix.lower() != ".zip"]
    if unknown:
        raise gr.Error(f"Not audio or .zip: {', '.join(unknown)}. Accepted: {', '.join(AUDIO_EXTENSIONS)}, .zip.")
    total = sum(p.stat().st_size for p in paths)
    if total > max_bytes:
        raise gr.Error(f"The upload is {_megabytes(total)}; the limit is {_megabytes(max_bytes)} per run "
                       "(DATAFLUX_UPLOAD_MAX_MB).")
    audio = [p for p in paths if p.suffix.lower() != ".zip"]
    if len(audio) > max_files:
        raise gr.Error(f"{len(audio)} audio files; the limit is {max_files} per run (DATAFLUX_UPLOAD_MAX_FILES).")
    destination.mkdir(parents=True, exist_ok=False)
    written: list[Path] = []
    try:
        for archive in (p for p in paths if p.suffix.lower() == ".zip"):
            if not zipfile.is_zipfile(archive):
                raise ImportRefused(f"{archive.name} is not a valid zip archive")
            budget_bytes = max_bytes - sum(p.stat().st_size for p in written)
            written += import_zip(archive, destination / archive.stem, max_bytes=budget_bytes,
                                  max_files=max_files - len(written))
        if audio:
            with tempfile.TemporaryDirectory(prefix="dataflux-upload-") as staging:
                for path in audio:
                    shutil.copyfile(path, Path(staging) / path.name)
                written += import_folder(staging, destination / "files",
                                         max_bytes=max_bytes - sum(p.stat().st_size for p in written),
                                         max_files=max_files - len(written))
    except ImportRefused as exc:
        shutil.rmtree(destination, ignore_errors=True)
        raise gr.Error(f"Import refused, nothing was imported: {exc}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(destination, ignore_errors=True)
        raise gr.Error(f"Import failed, nothing was imported: {exc}") from None
    if not written:
        shutil.rmtree(destination, ignore_errors=True)
        raise gr.Error(f"The upload holds no audio files ({', '.join(AUDIO_EXTENSIONS)}).")
    return written


def run_upload(config: ReviewConfig, username: str | None, model: Any, files: list[Any],
               pipeline: PipelineConfig, progress: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Import an upload and run the whole DataFlux pipeline on it with the app's model; returns the run's counts.

    The same step functions as ``run_pipeline``'s local engine (so a run started here resumes from the CLI and vice
    versa), with a progress report per clip. Starting a run writes to the database, so it needs a reviewer, who is
    named in the audit log.
    """
    reviewer = require_reviewer(config, username)
    report = progress or (lambda *args, **kwargs: None)
    started = time.perf_counter()
    destination = config.uploads_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    report(0.0, desc="importing the upload")
    written = import_upload(files, destination, config.max_upload_bytes, config.max_upload_files)
    store = config.store()
    components = Components(pipeline, model=model)
    run_id = start_run(store, str(destination), "local", pipeline)
    with store.transaction() as session:
        audit(session, reviewer, "run_requested", "run", run_id, audio_dir=str(destination), files=len(written))
    clip_ids = ingest(store, destination, run_id)
    category_ids = sync_categories(store, components.taxonomy)
    failed = 0
    for index, clip_id in enumerate(clip_ids):
        report((index, len(clip_ids)), desc=f"clip {index + 1} of {len(clip_ids)}: caption, questions, answers, "
                                            "judge", unit="clips")
        try:
            if process_clip(store, clip_id, components, category_ids, run_id):
                clear_error(store, clip_id)
        except Exception as exc:  # one bad clip must not stop the run; its error is kept on the clip row
            failed += 1
            record_error(store, clip_id, exc)
    counts = finish_run(store, run_id, clip_ids, failed)
    return {**counts, "run_id": run_id, "seconds": round(time.perf_counter() - started, 1),
            "audio_dir": str(destination)}


def run_summary(counts: dict[str, Any]) -> str:
    failed = f", {counts['failed_clips']} clips failed (their error is kept on the clip)" if counts["failed_clips"] \
        else ""
    return (f"Run {counts['run_id']} finished in {counts['seconds']} s: {counts['clips']} clips, "
            f"{counts['questions']} questions, {counts['kept']} kept and {counts['discarded']} discarded by the judge"
            f"{failed}. The new samples are in the queue (status pending).")


# --- the tab ------------------------------------------------------------------------------------------------------
def build_tab(ctx: AppContext, config: ReviewConfig) -> dict[str, Any]:
    """The Review tab's components and events. Returns ``on_open`` (fn, inputs, outputs) for the tab's select."""
    writable = not config.read_only
    loaded = gr.State(None)  # {"id", "version"} of the sample on screen: what a decision is checked against
    queue = gr.State({"filter": {}, "page": 1, "pages": 1, "ids": []})
    note = gr.Markdown(access_note(config, None), elem_id="review-note")
    with gr.Row():
        with gr.Column(scale=1, min_width=420):
            with gr.Row():
                status = gr.Dropdown([ANY, *SAMPLE_STATUSES], value=ANY, label="Status", elem_id="review-f-status",
                                     min_width=110)
                judge = gr.Dropdown(list(JUDGE_CHOICES), value=ANY, label="Judge outcome", elem_id="review-f-judge",
                                    min_width=110)
                consistency = gr.Dropdown([ANY, *CONSISTENCY], value=ANY, label="Consistency",
                                          elem_id="review-f-consistency", min_width=110)
            with gr.Row():
                category = gr.Dropdown([ANY], value=ANY, label="Category", elem_id="review-f-category", scale=2)
                agreement = gr.Dropdown(list(AGREEMENT_CHOICES), value=ANY, label="Answerers",
                                        elem_id="review-f-agreement", min_width=110)
            search = gr.Textbox(label="Search question and caption (Enter)", elem_id="review-search", max_lines=1)
            table = gr.Dataframe(headers=QUEUE_HEADERS, datatype=["number"] + ["str"] * (len(QUEUE_HEADERS) - 1),
                                 column_widths=QUEUE_WIDTHS, interactive=False, wrap=False,
                                 label="Queue (click a row to open it)",
                                 elem_id="review-queue", max_height=420)
            with gr.Row():
                previous_page = gr.Button("◀ Page", size="sm", elem_id="review-page-prev")
                page_info = gr.Textbox(show_label=False, interactive=False, elem_id="review-page-info",
                                       container=False, scale=2)
                next_page = gr.Button("Page ▶", size="sm", elem_id="review-page-next")
                refresh = gr.Button("↻ Refresh", size="sm", elem_id="review-refresh")
            bulk = gr.Button("Accept all pending judge-KEEP samples in this filter", interactive=writable,
                             elem_id="review-bulk")
        with gr.Column(scale=1, min_width=480):
            header = gr.Textbox(label="Sample", interactive=False, elem_id="review-header", lines=2)
            with gr.Row():
                audio = gr.Audio(type="numpy", label="Clip", interactive=False, elem_id="review-audio")
                spectrogram = gr.Plot(label="Spectrogram", elem_id="review-spectrogram")
            caption = gr.Textbox(label="Caption (the judge's ground truth)", interactive=False, lines=3, max_lines=8,
                                 elem_id="review-caption")
            question = gr.Textbox(label="Question", interactive=False, lines=5, elem_id="review-question")
            with gr.Row():
                with gr.Column():
                    answer_a = gr.Textbox(label="Model A", interactive=False, lines=2, elem_id="review-answer-a")
                    with gr.Accordion("Model A reasoning", open=False, elem_id="review-reasoning-a-box"):
                        reasoning_a = gr.Textbox(show_label=False, interactive=False, lines=6,
                                                 elem_id="review-reasoning-a")
                with gr.Column():
                    answer_b = gr.Textbox(label="Model B", interactive=False, lines=2, elem_id="review-answer-b")
                    with gr.Accordion("Model B reasoning", open=False, elem_id="review-reasoning-b-box"):
                        reasoning_b = gr.Textbox(show_label=False, interactive=False, lines=6,
                                                 elem_id="review-reasoning-b")
            verdict = gr.Textbox(label="Judge's verdict", interactive=False, lines=3, elem_id="review-verdict")
            with gr.Row():
                edit_choice = gr.Radio([], label="Right answer (for Edit)", elem_id="review-edit-choice", scale=2,
                                       interactive=writable)
                comment = gr.Textbox(label="Comment (needed to flag)", lines=2, elem_id="review-comment", scale=2,
                                     interactive=writable)
            with gr.Row():
                accept_button = gr.Button("Accept (a)", variant="primary", interactive=writable,
                                          elem_id="review-accept")
                reject_button = gr.Button("Reject (r)", variant="stop", interactive=writable, elem_id="review-reject")
                edit_button = gr.Button("Save edit", interactive=writable, elem_id="review-edit")
                flag_button = gr.Button("Flag (f)", interactive=writable, elem_id="review-flag")
                previous_sample = gr.Button("◀ Previous (k)", elem_id="review-prev")
                next_sample = gr.Button("Next (j) ▶", elem_id="review-next")
            message = gr.Textbox(label="Last action", interactive=False, elem_id="review-message")
            gr.Markdown(HELP)
            audit_table = gr.Dataframe(headers=AUDIT_HEADERS, datatype=["str"] * len(AUDIT_HEADERS),
                                       column_widths=AUDIT_WIDTHS, interactive=False, wrap=True,
                                       label="Audit log of this sample",
                                       elem_id="review-audit")
    with gr.Accordion("Statistics", open=False, elem_id="review-stats-box"):
        stats_refresh = gr.Button("Compute statistics", size="sm", elem_id="review-stats-refresh")
        agreement_text = gr.Textbox(label="Judge vs. human", interactive=False, elem_id="review-kappa")
        retention = gr.Dataframe(headers=RETENTION_HEADERS, interactive=False, wrap=True,
                                 label="Retention by category", elem_id="review-retention")
        accuracy = gr.Dataframe(headers=ACCURACY_HEADERS, interactive=False, wrap=True,
                                label="Answerer accuracy against accepted answers", elem_id="review-accuracy")
    with gr.Accordion("Start a run on new clips", open=False, elem_id="review-run-box"):
        gr.Markdown("Upload audio files or a `.zip` of them: they are imported safely (no paths outside the upload, "
                    f"no links; at most {_megabytes(config.max_upload_bytes)} and {config.max_upload_files} files) "
                    "and go through caption → questions → two answers → judge with the app's model, offline "
                    "question generator and rule judge.")
        with gr.Row():
            run_files = gr.File(file_count="multiple", file_types=["audio", ".zip"], type="filepath",
                                label="Clips or a .zip", elem_id="review-run-files", scale=2)
            with gr.Column():
                run_captioner = gr.Radio(["model", "reference"], value="model", label="Captioner",
                                         elem_id="review-run-captioner")
                run_categories = gr.Slider(1, 5, value=2, step=1, label="Categories per clip")
                run_tokens = gr.Slider(16, 512, value=200, step=8, label="Caption tokens")
        run_button = gr.Button("Start run", variant="primary", interactive=writable, elem_id="review-run-start")
        run_result = gr.Textbox(label="Run", interactive=False, elem_id="review-run-result")

    filters = [status, category, judge, consistency, agreement, search]
    sample_outputs = [loaded, header, audio, spectrogram, caption, question, answer_a, reasoning_a, answer_b,
                      reasoning_b, verdict, edit_choice, audit_table]
    queue_outputs = [table, queue, page_info]
    private = {"api_visibility": "private"}

    def show(sample_id: int | None) -> list[Any]:
        if sample_id is None:
            return [None, "No sample selected.", None, None, "", "", "", "", "", "", "",
                    gr.Radio(choices=[], value=None), pd.DataFrame(columns=AUDIT_HEADERS)]
        panel = sample_panel(config.store(), sample_id)
        sound, figure, audio_note = clip_audio(panel.clip_path)
        return [{"id": panel.id, "version": panel.version}, panel.header + audio_note, sound, figure, panel.caption,
                panel.question, panel.answers[0], panel.reasoning[0], panel.answers[1], panel.reasoning[1],
                panel.verdict, gr.Radio(choices=panel.options, value=panel.target if panel.target in panel.options
                                        else None), panel.audit]

    def current_filter(*values: Any) -> df_review.SampleFilter:
        return make_filter(*values)

    def open_tab(status_value: str, category_value: str, judge_value: str, consistency_value: str,
                 agreement_value: str, text: str, state: dict[str, Any], current: dict[str, Any] | None,
                 request: gr.Request) -> list[Any]:
        """Showing the tab refreshes the queue (others keep reviewing) but keeps the reviewer's page and sample."""
        store = config.store()
        values = (status_value, category_value, judge_value, consistency_value, agreement_value, text)
        rows, new_state, info = load_queue(store, current_filter(*values), int((state or {}).get("page", 1)))
        choices = category_choices(store)
        chosen = category_value if category_value in choices else ANY
        sample_id = current["id"] if current else (new_state["ids"][0] if new_state["ids"] else None)
        return [access_note(config, request_user(request)), gr.Dropdown(choices=choices, value=chosen), rows,
                new_state, info, *show(sample_id)]

    def filter_changed(*values: Any) -> list[Any]:
        rows, state, info = load_queue(config.store(), current_filter(*values))
        return [rows, state, info, *show(state["ids"][0] if state["ids"] else None)]

    def change_page(state: dict[str, Any], step: int) -> list[Any]:
        flt = df_review.SampleFilter(**state.get("filter", {}))
        rows, new_state, info = load_queue(config.store(), flt, int(state.get("page", 1)) + step)
        return [rows, new_state, info]

    def reload(state: dict[str, Any], current: dict[str, Any] | None) -> list[Any]:
        rows, new_state, info = change_page(state, 0)
        return [rows, new_state, info, *show(current["id"] if current else None)]

    def pick_row(state: dict[str, Any], event: gr.SelectData) -> list[Any]:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        ids = state.get("ids") or []
        if row is None or not 0 <= int(row) < len(ids):
            raise gr.Error("Pick a row of the queue.")
        return show(ids[int(row)])

    def move(state: dict[str, Any], current: dict[str, Any] | None, step: int) -> list[Any]:
        target, rows, new_state, info = neighbour(config.store(), state, current["id"] if current else None, step)
        if target is None:
            gr.Info("That is the " + ("last" if step > 0 else "first") + " sample of this filter.")
            return [gr.skip()] * (len(queue_outputs) + len(sample_outputs))
        table_value = rows if rows is not None else gr.skip()
        return [table_value, new_state, info if info is not None else gr.skip(), *show(target)]

    def act(action: str, current: dict[str, Any] | None, state: dict[str, Any], answer: str | None,
            text: str | None, request: gr.Request) -> list[Any]:
        username = request_user(request)
        require_reviewer(config, username)  # before anything else, whatever the caller sent
        keep_comment = gr.skip()
        try:
            result = perform(config, username, current, action, answer, text)
            keep_comment = ""
        except df_review.ConflictError as exc:
            result = f"Not saved: {exc}"
            gr.Warning(f"Not saved — {exc}", duration=None)
        rows, new_state, info = change_page(state, 0)
        return [result, keep_comment, rows, new_state, info, *show(current["id"])]

    def bulk_action(state: dict[str, Any], current: dict[str, Any] | None, request: gr.Request) -> list[Any]:
        result = bulk_accept(config, request_user(request), df_review.SampleFilter(**state.get("filter", {})))
        return [result, *change_page(state, 0), *show(current["id"] if current else None)]

    @gpu(ctx.gpu_seconds)
    def start(files: list[Any], captioner: str, categories: float, tokens: float, request: gr.Request,
              progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008 - Gradio's documented idiom
        username = request_user(request)
        require_reviewer(config, username)
        settings = PipelineConfig(model=ctx.loaded.choice.label, captioner=captioner,
                                  categories_per_clip=int(categories), caption_tokens=int(tokens))
        return run_summary(run_upload(config, username, ctx.model, files, settings, progress))

    def compute_stats() -> tuple[pd.DataFrame, str, pd.DataFrame]:
        retention_rows, summary, accuracy_rows = stats_tables(config.store())
        return retention_rows, summary, accuracy_rows

    for dropdown in (status, category, judge, consistency, agreement):
        dropdown.input(filter_changed, filters, queue_outputs + sample_outputs, **private)
    search.submit(filter_changed, filters, queue_outputs + sample_outputs, **private)
    refresh.click(reload, [queue, loaded], queue_outputs + sample_outputs, **private)
    previous_page.click(lambda state: change_page(state, -1), queue, queue_outputs, **private)
    next_page.click(lambda state: change_page(state, 1), queue, queue_outputs, **private)
    table.select(pick_row, queue, sample_outputs, **private)
    previous_sample.click(lambda state, current: move(state, current, -1), [queue, loaded],
                          queue_outputs + sample_outputs, **private)
    next_sample.click(lambda state, current: move(state, current, 1), [queue, loaded],
                      queue_outputs + sample_outputs, **private)
    action_outputs = [message, comment, *queue_outputs, *sample_outputs]
    for button, action in ((accept_button, "accept"), (reject_button, "reject"), (edit_button, "edit"),
                           (flag_button, "flag")):
        button.click(action_handler(act, action), [loaded, queue, edit_choice, comment], action_outputs, **private)
    bulk.click(bulk_action, [queue, loaded], [message, *queue_outputs, *sample_outputs], **private)
    stats_refresh.click(compute_stats, None, [retention, agreement_text, accuracy], **private)
    run_button.click(start, [run_files, run_captioner, run_categories, run_tokens], run_result,
                     **ctx.model_event(**private))
    return {"on_open": (open_tab, [*filters, queue, loaded], [note, category, *queue_outputs, *sample_outputs]),
            "loaded": loaded, "queue": queue, "table": table, "header": header, "accept": accept_button}


def action_handler(act: Callable[..., list[Any]], action: str) -> Callable[..., list[Any]]:
    """One button's callback. A named function with a ``gr.Request`` annotation: Gradio injects the request (and
    with it the logged-in user) only into parameters annotated that way, never into a lambda's."""
    def handler(current: dict[str, Any] | None, state: dict[str, Any], answer: str | None, text: str | None,
                request: gr.Request) -> list[Any]:
        return act(action, current, state, answer, text, request)

    handler.__name__ = f"review_{action}"
    return handler
