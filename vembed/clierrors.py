"""How every ``vembed`` subcommand reports a user error: one line on stderr and exit code 2, never a traceback.

A user error is something the person at the command line can fix: an unknown config key, a missing file, a bad
flag combination, a record the data reader refuses. The project's validation raises specific exception types
(``ConfigError``, ``RecordFileError``, ``CorpusError``, pydantic's ``ValidationError`` for serve settings, ...);
all of them derive from ``ValueError`` or ``OSError`` and carry a message that says what is wrong and where.
:func:`run_command` maps those to the one-line report; anything else (a bug) keeps its traceback. With
``--log-level debug`` a user error shows its traceback too.

:class:`VembedArgumentParser` makes argparse's own usage errors (a missing ``--input``, a bad choice) follow the
same one-line format, and shows each option's default in ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2

LOG_LEVELS = ("debug", "info", "warning", "error")


class UserError(Exception):
    """An error in what the user asked for; its message is the whole report (no traceback is shown)."""


# The exception families the project's validation raises for bad input (see the module docstring).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def plain(text: str) -> str:
    """Help text without reStructuredText/Markdown literals (docstrings feed some of it): ``x`` and `x` -> x."""
    return re.sub(r":\w+:`([^`]*)`", r"\1", text).replace("``", "").replace("`", "")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows ``(default: X)`` for every option that has a meaningful default, once, and no markup."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class VembedArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit 2) and whose help shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (pydantic and others spread theirs over several)."""
    errors = getattr(exc, "errors", None)
    if type(exc).__module__.startswith("pydantic") and callable(errors):  # a ValidationError: one clause per field
        clauses = []
        for error in errors():
            where = ".".join(str(part) for part in error.get("loc", ()))
            message = str(error.get("msg", "")).removeprefix("Value error, ")
            clauses.append(f"{where}: {message}" if where else message)
        return "; ".join(clauses)
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines)


def find_user_error(exc: BaseException) -> BaseException | None:
    """``exc`` itself when it is a user error, else the first user error it wraps (walking the wrappers Ray keeps
    the original in: :func:`vembed.training.failures.find_wrapped`), so a bad record raised inside a Ray worker
    still reaches the user as itself. An error raised while handling another (``__context__``) is a bug: not
    walked."""
    from vembed.training.failures import find_wrapped

    return find_wrapped(exc, lambda e: isinstance(e, USER_ERROR_TYPES) and not _is_internal(e), context=False)


def _is_internal(exc: BaseException) -> bool:
    """Ray's own exception types derive from builtins too; they are not messages meant for the user."""
    return type(exc).__module__.startswith("ray.")


def configure_logging(level: str | None) -> None:
    """Set the root log level from ``--log-level`` / ``-v`` (default: warning, so a run prints only its output)."""
    logging.basicConfig(
        level=getattr(logging, (level or "warning").upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("vembed").setLevel(getattr(logging, (level or "info").upper()))


def run_command(prog: str, command: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``command`` and return its exit code; a user error becomes ``prog: error: <message>`` and 2.

    ``debug`` (``--log-level debug``) re-raises so the traceback is shown.
    """
    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below; anything not a user error is re-raised
        found = find_user_error(exc)
        if found is None or debug:
            raise
        print(f"{prog}: error: {one_line(found)}", file=sys.stderr)
        return EXIT_USER_ERROR
