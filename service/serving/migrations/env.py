"""Alembic environment: migrations run on the connection the job store hands over
(``config.attributes["connection"]``), inside its transaction and lock."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
context.run_migrations()
