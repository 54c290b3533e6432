"""Exceptions shared across jaxstar."""


class UserError(ValueError):
  """A problem with the run's input that the user can fix: a config value, a missing or empty file, a checkpoint that does not fit, a mesh that does not fit the devices. The launcher prints its message as one line and exits with status 2."""
