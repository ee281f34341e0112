"""Errors a user can cause and fix. Anything else is a bug and may show a traceback.

Exit codes: 0 ok, 1 user error, 2 usage, 3 a quality gate (accuracy, equivalence or
latency budget) not met.
"""
from __future__ import annotations


class DeployError(Exception):
    """Something the user can fix; the message says what to do."""

    exit_code = 1


class UsageError(DeployError):
    """The command line or a config file is malformed."""

    exit_code = 2


class MissingBackendError(DeployError):
    """An optional package needed for a target is not installed."""

    def __init__(self, target: str, what: str, extra: str | None = None) -> None:
        extra = extra or target
        super().__init__(f"target {target} needs {what}: pip install 'deploykit[{extra}]'")


class QualityGateError(DeployError):
    """A measured figure is outside its budget (equivalence, accuracy, latency)."""

    exit_code = 3


class FusionError(QualityGateError):
    """A re-parameterized model does not compute the same function as the original."""


def one_line(err: BaseException, limit: int = 240) -> str:
    """The first non-empty line of ``err``'s message (else its type name), at most ``limit`` characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


class PartialFusionError(QualityGateError):
    """The fusion is exact but left BatchNorm or parallel branches the engine could not fold."""

    def __init__(self, message: str, certificate: object = None) -> None:
        super().__init__(message)
        self.certificate = certificate
