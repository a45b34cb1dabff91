"""The one exception type for mistakes a user can fix.

Raise :class:`ConfigError` with a single sentence that says what is wrong and how to fix it.
The ``fedpeft`` command prints that sentence on one line and exits with status 2; set
``FEDPEFT_DEBUG=1`` to see the traceback instead.
"""


class ConfigError(ValueError):
    """A user-fixable mistake in the configuration, the data or the environment."""
