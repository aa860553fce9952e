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


class OptionProblems(InputError):
    """What is wrong with one option group (a config dataclass): ``problems`` are (field, value as written, what is
    expected); the message names each as ``<prefix>.<field>=<value>``. An owner that reuses the group under other
    option names re-raises :meth:`renamed` (e.g. ``FidelityPreservationLoss.lora_rank`` for ``LoraConfig.rank``)."""

    def __init__(self, problems: list[tuple[str, str, str]], prefix: str, names: dict[str, str] | None = None):
        self.problems, self.prefix, self.names = problems, prefix, dict(names or {})
        lines = [f"{prefix}.{self.names.get(field, field)}={value}: {what}" for field, value, what in problems]
        super().__init__("invalid options:\n  " + "\n  ".join(lines))

    def renamed(self, prefix: str, names: dict[str, str]) -> "OptionProblems":
        return OptionProblems(self.problems, prefix, names)


def raise_problems(problems: list[tuple[str, str, str]], prefix: str) -> None:
    """Raise :class:`OptionProblems` if there is any problem (each (field, value as written, what is expected))."""
    if problems:
        raise OptionProblems(problems, prefix)


__all__ = ["InputError", "MissingInputFile", "MissingInputPackage", "OptionProblems", "raise_problems"]
