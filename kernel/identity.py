"""Who is calling: the identity every authenticated call carries."""

from __future__ import annotations

from dataclasses import dataclass

#: Role names as they appear in tokens, settings and the CLI. They match the
#: ``planes.common.v1.Role`` enum (``ROLE_ADMIN`` -> ``"admin"``).
ROLES: tuple[str, ...] = ("admin", "operator", "worker", "reviewer", "service")

#: The tenant value that lets an identity act for every tenant.
ALL_TENANTS = "*"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated principal, the tenant it acts for and its roles."""

    principal: str
    tenant: str
    roles: frozenset[str]
    #: How the identity was established: ``"token"``, ``"mtls"`` or ``"kernel"``.
    source: str = "token"
    #: Token id (``jti``) when the identity came from a token.
    token_id: str = ""

    def has_any_role(self, roles: frozenset[str]) -> bool:
        return not self.roles.isdisjoint(roles)

    def may_act_for(self, tenant: str) -> bool:
        return self.tenant == ALL_TENANTS or self.tenant == tenant
