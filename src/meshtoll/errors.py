"""The one exception tree of meshtoll.

    MeshtollError                 base of everything meshtoll raises on purpose
    ├── PolicyError               a policy document is invalid; carries every problem found
    │                             (each a PolicyProblem: file, line, field path, message)
    ├── ConfigError               a command-line / environment setting is invalid
    ├── StorageUnavailable        the shared store did not answer in time (transient: retry,
    │                             or apply the configured failure policy)
    ├── InvalidRateLimitRequest   an RLS request envoyproxy/ratelimit answers with an error
    │                             (no domain, no descriptors)
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


class StorageUnavailable(MeshtollError):
    """The shared store could not be reached in time; transient by nature."""


class InvalidRateLimitRequest(MeshtollError):
    """A rate-limit request that cannot be answered: envoyproxy/ratelimit returns an error."""


class EnvoyNotFound(MeshtollError):
    """No Envoy binary was found to run the local stack with."""


class ProcessStartError(MeshtollError):
    """A child process of the local stack exited or did not become ready in time."""
