"""Alembic migrations of the job store's schema (SQLite and PostgreSQL alike); applied by
:func:`forcedphot.serving.job_store.migrate` when a store opens."""
