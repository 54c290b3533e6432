"""Exceptions shared across jaxstar."""


class UserError(ValueError):
  """A problem with the run's input that the user can fix.

  A config value, a missing or empty file, a checkpoint that does not fit, a mesh that does not
  fit the devices. The launcher prints its message as one line and exits with status 2.
  """


# What the launcher reports as one line with exit status 2 instead of a traceback: problems
# with the run's input. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (whitespace runs collapsed)."""
  return " ".join(str(error).split()) or type(error).__name__
