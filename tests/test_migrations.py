"""The Alembic migrations alone build the schema the models describe, on Postgres and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.infra.db import Base, get_engine, make_engine
from app.infra.models import ApiKey, Job, WebhookAttempt, WebhookDelivery

REPO = Path(__file__).resolve().parent.parent
TABLES = {m.__tablename__ for m in (ApiKey, Job, WebhookDelivery, WebhookAttempt)}


def alembic_config(url: str) -> Config:
    cfg = Config(str(REPO / "alembic.ini"))
    cfg.attributes["database_url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


def assert_matches_models(url: str) -> None:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        assert set(inspect(conn).get_table_names()) >= TABLES
    engine.dispose()


def test_postgres_schema_comes_from_migrations(database: str) -> None:
    assert_matches_models(database)
    with get_engine().connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is not None


def test_sqlite_from_empty_up_and_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'whisperq.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    assert_matches_models(url)
    command.downgrade(cfg, "base")
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    command.upgrade(cfg, "head")
    assert_matches_models(url)


@pytest.mark.parametrize("name", ["ix_jobs_api_key_id_created_at", "ix_jobs_status_created_at"])
def test_job_indexes_exist(database: str, name: str) -> None:
    with get_engine().connect() as conn:
        assert name in {ix["name"] for ix in inspect(conn).get_indexes("jobs")}
