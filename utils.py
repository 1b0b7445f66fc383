"""Shared helpers: user-facing errors, seeding, the identity-balanced sampler, meters, logging
and checkpoint I/O."""


class UserError(Exception):
    """An error the user caused (path, file, flag, checkpoint); its message is one sentence that
    says what was expected and where. The scripts print it without a stack trace and exit 2."""
