"""Reviewers: who may write review decisions (and, later, log in to the Gradio review tab).

Users come from ``DATAFLUX_REVIEWERS="alice:pw,bob:pw"`` or from a file named by ``DATAFLUX_REVIEWERS_FILE`` (one
``name:password`` per line, ``#`` comments). Every write action names a reviewer, and that name must be in the list:
an audit log is only worth something if its actor names are real accounts.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_USERS = "DATAFLUX_REVIEWERS"
ENV_FILE = "DATAFLUX_REVIEWERS_FILE"


class AuthError(PermissionError):
    """A write by someone who is not a configured reviewer."""


def parse_users(text: str) -> dict[str, str]:
    """``name:password`` pairs separated by commas or newlines (blank entries and ``#`` comments skipped)."""
    users: dict[str, str] = {}
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, password = entry.partition(":")
        if not sep or not name.strip() or not password:
            raise ValueError(f"reviewer entry {entry.split(':')[0]!r} must look like name:password")
        users[name.strip()] = password
    return users


@dataclass
class Reviewers:
    users: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Reviewers:
        env = os.environ if environ is None else environ
        users: dict[str, str] = {}
        if env.get(ENV_FILE):
            users.update(parse_users(Path(env[ENV_FILE]).read_text(encoding="utf-8")))
        if env.get(ENV_USERS):
            users.update(parse_users(env[ENV_USERS]))
        return cls(users)

    def check_password(self, name: str, password: str) -> bool:
        """Constant-time password check (usable as Gradio's ``auth=`` callable)."""
        expected = self.users.get(name)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def __call__(self, name: str, password: str) -> bool:
        return self.check_password(name, password)

    def require(self, name: str | None) -> str:
        """The reviewer name, or ``AuthError`` when it is not a configured reviewer."""
        if not self.users:
            raise AuthError(f"no reviewers are configured: set {ENV_USERS}=name:password,... or {ENV_FILE}")
        if not name or name not in self.users:
            raise AuthError(f"{name!r} is not a reviewer; write actions need one of: {', '.join(sorted(self.users))}")
        return name
