"""The project's own error type for bad user input.

Every problem with what a user hands us (a config value, a prompt/entity/mask/latent file, a path) is raised as an
:class:`InputError` whose message names the option, or the file and line, and says what was expected. It subclasses
``ValueError`` so existing ``except ValueError`` code keeps working; anything else that escapes is a bug in our
checks, not the user's fault (tests/test_input_properties.py holds us to that).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message names the option or file:line and what was expected."""


class MissingInputFile(InputError, FileNotFoundError):
    """A file or folder the user named does not exist. Also a ``FileNotFoundError``, so callers that catch the
    built-in type keep working."""


class MissingInputPackage(InputError, OSError):
    """A named resource that must be installed (e.g. a spaCy pipeline) is not. Also an ``OSError``, the type the
    library itself raises for it."""


__all__ = ["InputError", "MissingInputFile", "MissingInputPackage"]
