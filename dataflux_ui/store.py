"""Opening the DataFlux store: any SQLAlchemy URL, SQLite by default, schema brought to Alembic ``head`` on open.

SQLite gets WAL mode (readers never block the single writer, and a killed writer leaves the database consistent),
``foreign_keys=ON`` (off by default in SQLite) and a busy timeout, set on every new connection. The audit log is
guarded in the ORM here and by triggers in the migration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from .models import AuditEntry, Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_MS = 30000


class AuditLogError(RuntimeError):
    """Raised when code tries to change or delete an audit-log entry."""


def normalise_url(url: str | os.PathLike) -> str:
    """A bare file path means a SQLite file; anything with ``://`` is passed to SQLAlchemy as is."""
    text = str(url)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str | os.PathLike) -> Engine:
    """An engine with our per-connection settings (SQLite pragmas; PostgreSQL needs none)."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(connection: Any | None = None):
    """Alembic's configuration, built in code (no alembic.ini lookup relative to the working directory)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def _refuse_audit_changes(session: Session, _context: Any, _instances: Any) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEntry) and (obj in session.deleted or session.is_modified(obj)):
            raise AuditLogError("the audit log is append-only: entries cannot be changed or deleted")


def _refuse_bulk_audit_changes(state: Any) -> None:
    if (state.is_update or state.is_delete) and state.bind_mapper is not None:
        if state.bind_mapper.class_ is AuditEntry:
            raise AuditLogError("the audit log is append-only: entries cannot be changed or deleted")


def install_audit_guard(factory: sessionmaker) -> None:
    """Refuse ORM updates/deletes of audit entries, row by row and in bulk (the DB triggers back this up)."""
    event.listen(factory, "before_flush", _refuse_audit_changes)
    event.listen(factory, "do_orm_execute", _refuse_bulk_audit_changes)


class Store:
    """The database behind DataFlux: an engine plus a session factory with the audit guard installed."""

    def __init__(self, url: str | os.PathLike, migrate: bool = True):
        self.url = normalise_url(url)
        self.engine = make_engine(self.url)
        if migrate:
            upgrade(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        install_audit_guard(self.sessions)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for reads (and writes the caller commits)."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self.sessions.begin() as session:
            yield session

    def tables(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_store(url: str | os.PathLike, migrate: bool = True) -> Store:
    """Open (and by default migrate) the store at ``url`` — a SQLAlchemy URL or a SQLite file path."""
    return Store(url, migrate=migrate)


def audit(session: Session, actor: str, action: str, entity: str, entity_id: int | None,
          **detail: Any) -> AuditEntry:
    """Append one audit entry to the session's transaction (so it commits or rolls back with the change)."""
    entry = AuditEntry(actor=actor, action=action, entity=entity, entity_id=entity_id, detail=detail)
    session.add(entry)
    return entry


# Keep the declarative metadata reachable from here for Alembic's env.py and for tests.
metadata = Base.metadata
