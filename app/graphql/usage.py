"""storageUsage: the ADMIN's view of how much the masks take, from the database."""

from __future__ import annotations

import strawberry

from app import usage
from app.graphql.context import Info
from app.graphql.types import BigInt
from app.principals import Role, require

# Registers the domain enum with GraphQL in place, as principals.Role is.
StorageUsageGrouping = strawberry.enum(
    usage.UsageGrouping,
    name="StorageUsageGrouping",
    description="MODEL: by model name. ANNOTATION: by annotation id. MODALITY: by modality. "
    "DAY: by the UTC day the mask group was created.",
)


@strawberry.type
class StorageUsage:
    key: str = strawberry.field(
        description="the model name, annotation id, modality or ISO day the row is for; "
        "empty for groups without a model name or modality"
    )
    mask_group_count: int
    object_count: int
    total_bytes: BigInt


async def storage_usage(
    info: Info, group_by: usage.UsageGrouping = usage.UsageGrouping.MODEL
) -> list[StorageUsage]:
    require(info.context.principal, Role.ADMIN)
    async with info.context.sessionmaker() as session:
        rows = await usage.storage_usage(session, group_by)
    return [
        StorageUsage(
            key=row.key,
            mask_group_count=row.mask_group_count,
            object_count=row.object_count,
            total_bytes=BigInt(row.total_bytes),
        )
        for row in rows
    ]
