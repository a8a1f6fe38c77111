"""The one exception type a user sees: a sentence saying what is wrong and what to do."""

__all__ = ["CellfitError"]


class CellfitError(Exception):
    """A problem with the user's input or environment.

    The message is a complete sentence (what is wrong, what to do). The CLI prints it
    without a traceback and exits with status 2; the plugin shows it as a notification.
    """
