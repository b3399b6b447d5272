"""The jobs table and the write probe; stores made before migrations existed (SQLite tables
created directly, perhaps without the ``client`` column) are adopted as they are.

Revision ID: 0001
"""

from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    tables = sa.inspect(op.get_bind()).get_table_names()
    if "jobs" not in tables:
        op.create_table(
            "jobs",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("idempotency_key", sa.Text, unique=True),
            sa.Column("fingerprint", sa.Text, nullable=False),
            sa.Column("state", sa.Text, nullable=False),
            sa.Column("spec", sa.Text, nullable=False),
            sa.Column("created", sa.Double, nullable=False),  # seconds since the epoch (float64)
            sa.Column("started", sa.Double),
            sa.Column("finished", sa.Double),
            sa.Column("heartbeat", sa.Double),
            sa.Column("owner", sa.Text),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("exposures_done", sa.Integer, nullable=False, server_default="0"),
            sa.Column("exposures_total", sa.Integer, nullable=False),
            sa.Column("fraction", sa.Double, nullable=False, server_default="0"),
            sa.Column("errors", sa.Text, nullable=False, server_default="[]"),
            sa.Column("rows", sa.Integer),
            sa.Column("client", sa.Text),
        )
        op.create_index("jobs_by_state", "jobs", ["state", "created"])
    elif "client" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("jobs")}:
        op.add_column("jobs", sa.Column("client", sa.Text))
    if "probe" not in tables:
        op.create_table("probe", sa.Column("id", sa.Integer, primary_key=True), sa.Column("at", sa.Double))


def downgrade() -> None:
    op.drop_table("probe")
    op.drop_index("jobs_by_state", "jobs")
    op.drop_table("jobs")
