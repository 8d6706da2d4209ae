"""Alembic migrations, shipped inside the installed package so ``whisperq migrate`` works
from any folder after a plain ``pip install`` (see app/infra/migrate.py)."""
