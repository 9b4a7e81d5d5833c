"""Errors a user can act on. The CLI prints each as one line and exits 2."""


class EdgeAwqError(Exception):
    """Base of every error that names a problem and its fix."""


class ConfigError(EdgeAwqError):
    """A model configuration the project cannot run (unsupported architecture, bad field)."""


class FormatError(EdgeAwqError):
    """A model or packed file that is missing, truncated, corrupt or of the wrong version."""


class InputError(EdgeAwqError):
    """A request or text the command cannot use (empty text, context too long)."""


class DoesNotFit(InputError):
    """The model will not fit the memory at hand: the message is the plan's table, then one line."""


class BackendUnavailable(EdgeAwqError):
    """The asked-for compute backend cannot run on this machine."""


class KernelError(EdgeAwqError):
    """A native kernel refused its arguments or the device failed; names the call and the shapes."""
