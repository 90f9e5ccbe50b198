"""Clients and their credentials: who may call, for which tenant, with which role.

With no client configured the sidecar runs in open mode (one default tenant, every role):
meant for a single-tenant sidecar on 127.0.0.1. Once clients are configured, every API
call must name one (HTTP Basic `client_id:secret` and/or `X-Client-ID`, as the AxonFlow
SDK sends them), and its tenant partitions budgets, limits and counters.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"  # decisions, reads, and definition writes
    AGENT = "agent"  # decisions and reads
    READ = "read"  # reads only


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    tenant: str
    role: Role
    # SHA-256 of the secret; None: the client is identified by its id alone.
    secret_sha256: bytes | None

    def accepts(self, secret: str | None) -> bool:
        """Constant-time check of a presented secret against the stored hash."""
        if self.secret_sha256 is None:
            return True
        if secret is None:
            return False
        presented = hashlib.sha256(secret.encode("utf-8")).digest()
        return hmac.compare_digest(presented, self.secret_sha256)

    def may(self, needed: Role) -> bool:
        if needed is Role.READ:
            return True
        if needed is Role.AGENT:
            return self.role in (Role.AGENT, Role.ADMIN)
        return self.role is Role.ADMIN


OPEN = Client(client_id="", tenant="default", role=Role.ADMIN, secret_sha256=None)
