"""Short reports for configuration and input errors at the command line: a few lines naming the option, the config
file:line or the class path, with the closest valid name, instead of a traceback and a usage dump.

Only errors that are the user's to fix are reported this way: an :class:`~comat_lightning.errors.InputError` (our
own checks) anywhere in the exception's chain, or the argument parser's error (an unknown option or class path, a
value of the wrong type). Anything else is a bug and keeps its traceback. ``COMAT_TRACEBACK=1`` shows the full
traceback for every error.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
from pathlib import Path

from comat_lightning.errors import InputError

TRACEBACK_SWITCH = "COMAT_TRACEBACK"  # set to 1 to see the full traceback of any error
MAX_LINES = 5  # a report longer than this is cut: the first lines name the culprit
HINT = f"(full traceback: {TRACEBACK_SWITCH}=1)"


def full_traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_SWITCH, "").strip().lower() not in ("", "0", "false", "no")


def input_error_in_chain(error: BaseException) -> InputError | None:
    """The first :class:`InputError` in ``error``'s cause/context chain: jsonargparse and Lightning wrap ours."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def short_report(error: BaseException, argv: list[str], options: list[str] | None = None) -> str | None:
    """The report for ``error`` (at most :data:`MAX_LINES` lines, ending with how to see the traceback), or None when
    it is not a configuration or input error. ``options``: the valid ``--option`` names, for suggestions."""
    configs = config_files(argv)
    ours = input_error_in_chain(error)
    if ours is not None:
        message = str(ours)
        where = locate_input_error(message, configs)
    elif isinstance(error, argparse.ArgumentError):
        message, where = explain_parser_error(str(error), configs, options or [])
    else:
        return None
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()] or [type(error).__name__]
    lines[0] = f"error: {where + ': ' if where else ''}{lines[0]}"
    if len(lines) > MAX_LINES - 1:
        lines = lines[: MAX_LINES - 2] + [f"  ... ({len(lines) - (MAX_LINES - 2)} more lines)"]
    return "\n".join(lines + [HINT])


def explain_parser_error(message: str, configs: list[Path], options: list[str]) -> tuple[str, str]:
    """The parser's message made short: (what is wrong with a suggestion, where)."""
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown:
        return unknown_option(unknown.group(1).split("=")[0], options), ""
    bad_class = re.search(r"Problem with given class_path '([^']+)'", message)
    if bad_class:
        path = bad_class.group(1)
        return f"unknown class_path {path!r}{suggest(path, class_paths_near(path))}", locate_value(configs, path)
    not_expected = re.search(r"Key ['\"]([\w.]+)['\"] is not expected", message) or re.search(
        r"No action for key ['\"]?([\w.]+)", message
    )
    if not_expected:
        key = not_expected.group(1)
        return unknown_option(f"--{key}", options), locate_key(configs, key)
    key = re.search(r'Parser key "([\w.]+)"', message)
    detail = next((line.strip() for line in message.splitlines()[1:] if line.strip()), "")
    if key:
        return f"option {key.group(1)}: {detail}", locate_key(configs, key.group(1))
    return message.splitlines()[0] if message else "invalid arguments", ""


def unknown_option(option: str, options: list[str]) -> str:
    """``--model.sampler.num_stepz`` -> "unknown option ... did you mean --model.sampler.num_inference_steps?": the
    closest option of the same group first (the typo is usually in the last part), then of all options."""
    group = option.rsplit(".", 1)[0] + "." if "." in option else "--"
    siblings = [o for o in options if o.startswith(group) and "." not in o[len(group) :]]
    return f"unknown option {option}{suggest(option, siblings) or suggest(option, options)}"


def suggest(name: str, candidates: list[str]) -> str:
    """': did you mean X?' for the closest candidate (compared on the last dotted part, where typos are), or ''."""
    tail = name.rsplit(".", 1)[-1].lower()
    by_tail = {candidate.rsplit(".", 1)[-1].lower(): candidate for candidate in reversed(candidates)}
    close = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.5)
    return f": did you mean {by_tail[close[0]]}?" if close else ""


def class_paths_near(path: str) -> list[str]:
    """The public names of ``path``'s module (``callbacks.ConceptMatchingLos`` -> ``callbacks.*``), or of the
    project's short-name packages when the module itself does not import."""
    module_name = path.rpartition(".")[0]
    modules = [module_name] if module_name else []
    modules += [name for name in ("callbacks", "comat_lightning", "lightning.pytorch.callbacks") if name != module_name]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a misspelt module: try the next candidate
            continue
        exported = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        return [f"{name}.{attribute}" for attribute in exported if attribute[:1].isupper()]
    return []


def config_files(argv: list[str]) -> list[Path]:
    """The ``--config`` files named on the command line, last first (a later file overrides an earlier one)."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return [f for f in reversed(files) if f.is_file()]


def yaml_nodes(path: Path):
    """(key path, key node, value node) for every mapping entry of a YAML file, list items as ``[i]``."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except Exception:  # noqa: BLE001 - an unreadable file: no location, the message still names the problem
        return
    stack = [("", root)]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                yield name, key, value
                stack.append((name, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((f"{prefix}[{i}]", item) for i, item in enumerate(node.value))


def locate_key(configs: list[Path], key: str) -> str:
    """``file:line`` where ``key`` (dotted, e.g. ``model.sampler.num_stepz``) is written, or ''."""
    for path in configs:
        for name, key_node, _ in yaml_nodes(path):
            if name == key:
                return f"{path}:{key_node.start_mark.line + 1}"
    return ""


def locate_value(configs: list[Path], value: str) -> str:
    """``file:line`` of the first scalar equal to ``value`` (e.g. a class_path), or ''."""
    for path in configs:
        for _, _, node in yaml_nodes(path):
            if getattr(node, "value", None) == value:
                return f"{path}:{node.start_mark.line + 1}"
    return ""


def locate_input_error(message: str, configs: list[Path]) -> str:
    """For ``Owner: option ...`` or ``Owner.option=value`` messages of a configured class: the ``file:line`` of that
    option under the entry whose class_path ends with ``Owner``; '' when the message already names a file."""
    found = re.match(r"(?:invalid options:\s*)?([A-Z]\w*)(?::\s+|\.)(\w+)", message.strip())
    if not found:
        return ""
    owner, option = found.groups()
    for path in configs:
        owners = {
            name.rsplit(".class_path", 1)[0]
            for name, _, node in yaml_nodes(path)
            if name.endswith("class_path") and str(getattr(node, "value", "")).rsplit(".", 1)[-1] == owner
        }
        for name, key_node, _ in yaml_nodes(path):
            if name.endswith(f".{option}") and any(name == f"{o}.init_args.{option}" for o in owners):
                return f"{path}:{key_node.start_mark.line + 1}"
    return ""
