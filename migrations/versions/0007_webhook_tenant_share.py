"""Webhook attempts take turns between tenants: `tenants.webhook_busy_until`, the workers' time a tenant's attempts
have used (a virtual clock; see worker/webhooks.py). A tenant whose receivers hang for the whole timeout waits
for its share of the workers' time instead of taking them from the other tenants' deliveries and training.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("webhook_busy_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as b:
        b.drop_column("webhook_busy_until")
