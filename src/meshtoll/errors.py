"""The one exception tree of meshtoll.

    MeshtollError                 base of everything meshtoll raises on purpose
    ├── PolicyError               a policy document is invalid; carries every problem found
    │                             (each a PolicyProblem: file, line, field path, message)
    ├── ConfigError               a command-line / environment setting is invalid
    ├── StorageError              a call to the shared store failed; `transient` says whether
    │   │                         the same call may succeed later. Callers apply the
    │   │                         configured failure policy to both.
    │   ├── StorageUnavailable    no answer in time, or the connection broke (transient)
    │   │   └── ConnectionLost    the lean Redis client's connection closed under a call
    │   └── StorageRefused        Redis answered with an error a retry will not fix (a
    │                             script it refuses, a wrong type at a key)
    ├── TokenRejected             a credential (JWT, key) the client sent does not identify it;
    │                             carries the stable error code of the refusal
    ├── UnknownTenant             a tenant the policy does not name
    ├── TenantConflict            a run-time tenant change the registry refuses: the tenant's
    │                             version is not the one it was made from, or a key hash
    │                             belongs to another tenant (nothing changed)
    ├── TenantChangeRefused       a change to run-time tenants or keys that is not made: its
    │                             stable error code, and the problems of an invalid one
    ├── NotBillable               a tenant that cannot be invoiced (unknown, or no price)
    ├── BadPeriod                 text that names no billing period
    ├── MalformedLine             an access-log body that is not a meter line (counted, dropped)
    ├── InvalidRateLimitRequest   an RLS request envoyproxy/ratelimit answers with an error
    │                             (no domain, no descriptors)
    ├── DeliveryStalled           a billing sink cannot go on: its target kept failing past
    │                             the attempts a one-shot push allows, or another instance
    │                             holds the sink's lease
    ├── LeaseLost                 a billing sink's lease expired under it and another took it
    ├── EnvoyNotFound             no Envoy binary to run the local stack with
    └── ProcessStartError         a child of the local stack exited or was not ready in time

Foreign exceptions (redis, grpc, OS, YAML) are translated into these at the module that
talks to the foreign library; nothing above that layer sees them.
"""

from __future__ import annotations

from dataclasses import dataclass


class MeshtollError(Exception):
    """Base class of every error meshtoll raises on purpose."""


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy document, located as precisely as the document allows."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(MeshtollError):
    """A policy document failed to load; `problems` lists every problem found, in order."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


class ConfigError(MeshtollError):
    """A setting given on the command line or in the environment is invalid."""


class StorageError(MeshtollError):
    """A call to the shared store failed."""

    transient = False


class StorageUnavailable(StorageError):
    """The shared store could not be reached in time; transient by nature."""

    transient = True


class ConnectionLost(StorageUnavailable):
    """The connection to Redis closed while calls were waiting on it."""


class StorageRefused(StorageError):
    """The store answered with an error: retrying the same call will not help."""


class TokenRejected(MeshtollError):
    """A credential does not identify the caller: `code` is the stable error code of the
    refusal. `unavailable`: the keys to check it could not be had, not the client's fault."""

    def __init__(self, code: str, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.unavailable = unavailable


class UnknownTenant(MeshtollError):
    """A tenant the policy does not name."""


class TenantConflict(MeshtollError):
    """A change the tenant registry refuses; `kind` is "stale" (`current`: the tenant's
    version, 0 when it does not exist) or "key_in_use" (`detail`: the tenant holding it)."""

    def __init__(self, kind: str, message: str, *, current: int = 0, detail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.current = current
        self.detail = detail


class TenantChangeRefused(MeshtollError):
    """A change to a run-time tenant or key that was refused, nothing changed. `code` is stable
    (invalid_tenant, unknown_tenant, unknown_key, file_tenant, tenant_exists, key_exists,
    key_in_use, precondition_failed, conflict); `problems` are (field path, message) pairs of
    an invalid one; `current` the tenant's version, for a stale precondition."""

    def __init__(
        self, code: str, message: str, problems: tuple[tuple[str, str], ...] = (), current: int = 0
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.problems = problems
        self.current = current


class NotBillable(MeshtollError):
    """The tenant is unknown, or its plan has no price."""


class BadPeriod(MeshtollError):
    """Text that is not a period in the expected form, or names a month that does not exist."""


class MalformedLine(MeshtollError):
    """An access-log body that is not a meter line of this version."""


class InvalidRateLimitRequest(MeshtollError):
    """A rate-limit request that cannot be answered: envoyproxy/ratelimit returns an error."""


class DeliveryStalled(MeshtollError):
    """A billing sink cannot go on (its target keeps failing, or another instance delivers)."""


class LeaseLost(MeshtollError):
    """A billing sink no longer holds its lease: another instance delivers now."""


class EnvoyNotFound(MeshtollError):
    """No Envoy binary was found to run the local stack with."""


class ProcessStartError(MeshtollError):
    """A child process of the local stack exited or did not become ready in time."""
