"""Who acts and what they may do: roles, principals and the user-name rule. Persisted (the
token table stores a Role), so it depends on nothing but errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from app.errors import Forbidden

USER_NAME_MAX = 128


class Role(enum.Enum):
    READER = "READER"
    UPLOADER = "UPLOADER"
    ADMIN = "ADMIN"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READER: 0, Role.UPLOADER: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    role: Role


ANONYMOUS_ADMIN = Principal(user="anonymous", role=Role.ADMIN)


def usable_user_name(user: str) -> str | None:
    """The name as stored (stripped), or None when it cannot be one: names land in audit
    records and created_by, whether they come from an API token or an OIDC claim."""
    user = user.strip()
    if not user or len(user) > USER_NAME_MAX or any(ord(char) < 32 for char in user):
        return None
    return user


def require(principal: Principal, needed: Role) -> None:
    if not principal.role.allows(needed):
        raise Forbidden(f"this needs the {needed.value} role; you have {principal.role.value}")


def require_owner(principal: Principal, created_by: str | None, what: str) -> None:
    """UPLOADERs change only what they created; ADMINs change anything."""
    require(principal, Role.UPLOADER)
    if principal.role is not Role.ADMIN and created_by != principal.user:
        raise Forbidden(f"{what} belongs to another user")
