"""User-facing errors.

Every error a user can cause is a ``KvpipeError`` whose message is one line naming the
thing at fault and the fix. The CLI catches this class once, prints the message and exits 2;
library users get the exception itself.
"""


class KvpipeError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class UsageError(KvpipeError):
    """An option, name or combination of options that cannot work."""


class DataError(KvpipeError):
    """A dataset root, image or annotation that is missing or malformed."""


class StoreError(KvpipeError):
    """A feature store that is missing, foreign, newer than this code, or corrupt."""


class ModelError(KvpipeError):
    """A model that cannot be loaded or does not have the expected structure."""
