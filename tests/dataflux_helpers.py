"""Shared helpers for the DataFlux tests: a throwaway PostgreSQL server, scripted answerers, a sample factory."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from dataflux_ui.answers import response_text
from dataflux_ui.core import AnswerResult, ClipContext
from dataflux_ui.models import Answer, Caption, Category, Clip, Generation, Question, Sample, Verdict


def postgres_bin() -> Path | None:
    """The PostgreSQL server binaries (Debian layout), newest version first."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if found:
        return found[0].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """A private PostgreSQL cluster in a temp dir, reachable only through a unix socket in that dir.

    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (or ``nobody``).
    """

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="dataflux-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.root, self.user)
        os.chmod(self.root, 0o755)

    def _run(self, *args: str) -> None:
        command = ([ "runuser", "-u", self.user, "--"] if self.user else []) + list(args)
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses='' -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class FixedAnswerer:
    """Always picks the same letter: makes judge outcomes predictable without a model."""

    def __init__(self, letter: str):
        self.letter = letter
        self.name = f"always-{letter}"

    def answer(self, clip: ClipContext, questions: list[str]) -> list[AnswerResult]:
        return [AnswerResult(self.name, f"scripted: always {self.letter}", self.letter,
                             response_text(q, self.letter), self.letter) for q in questions]


def make_sample(session, tag: str = "x", key: str | None = "A", a: str | None = "A", b: str | None = "B",
                keep: bool = True) -> Sample:
    """A minimal clip → caption → question → answers → verdict → sample graph, added to ``session``."""
    category = session.query(Category).filter_by(key=f"cat-{tag}").one_or_none() or Category(
        key=f"cat-{tag}", l0="Speech", l1="Paralinguistics", l2="Speaker", l3=f"Gender {tag}",
        path=f"Speech > Paralinguistics > Speaker > Gender {tag}", exemplars=[])
    clip = Clip(sha256=uuid.uuid4().hex * 2, path=f"/tmp/{tag}.wav", duration_s=1.0, source_meta={})
    clip.caption = Caption(captioner="test", model_text="a female voice", facts={}, text=f"a female voice {tag}")
    generation = Generation(clip=clip, category=category, generator="test", is_success=True, reply={})
    question = Question(generation=generation, clip=clip, category=category, position=0,
                        text="What is the gender of the speaker?\nA. Female\nB. Male\nC. A child\nD. A robot",
                        stem="What is the gender of the speaker?", option_a="Female", option_b="Male",
                        option_c="A child", option_d="A robot", correct_option=key)
    question.answers = [Answer(slot="A", answerer="m:greedy", reasoning="r", chosen_option=a,
                               response=f"{a}. x" if a else "", raw_text=a or "?"),
                        Answer(slot="B", answerer="m:sampled", reasoning="r", chosen_option=b,
                               response=f"{b}. x" if b else "", raw_text=b or "?")]
    question.verdict = Verdict(judge="test", consensus=a == b, consistency_with_caption="STRONG_MATCH",
                               winner="MODEL_A" if keep else "NONE", reasoning="because",
                               final_action="KEEP_USING_WINNER" if keep else "DISCARD")
    sample = Sample(question=question, status="pending", version=1, judge_keep=keep,
                    target="A. Female" if keep else None)
    session.add(sample)
    return sample
