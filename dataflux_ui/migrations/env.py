"""Alembic environment: the connection comes from ``store.upgrade`` (or a URL in the config, for the alembic CLI)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from dataflux_ui.models import Base

config = context.config
target_metadata = Base.metadata


def run_with(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so later migrations copy-and-move tables there.
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        run_with(connection)


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_online()
