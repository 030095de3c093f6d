"""Deliveries waiting for their tenant's webhook turn wait in line: `webhook_deliveries.waiting_turn` marks them, and
each one that must wait is put after the last of its tenant's (worker/webhooks.py). Before, every waiting delivery
of a tenant woke at the same moment, one took the turn and the others each made a worker check the tenant again:
N waiting deliveries cost N checks per turn, uncharged to the tenant.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("webhook_deliveries", sa.Column("waiting_turn", sa.Boolean(), nullable=False,
                                                  server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as b:
        b.drop_column("waiting_turn")
