"""The user's error inside a failed Ray run: what ``VEmbedFactoryTrainer.train`` and ``vembed train`` raise.

A bad record or a malformed file raised in a Ray Data task, or in a Ray Train worker, reaches the driver wrapped
in Ray's errors (``RayTaskError``, Ray Train's ``WorkerGroupError`` / ``ControllerError`` around a
``UserExceptionWithTraceback``), whose message is a screen of remote stack trace with the useful
``file:line: what is wrong`` buried in it. :func:`user_error` digs the original vembed error out, so the edge can
raise it alone, as its own type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

# What Ray Data appends to the message of an exception raised in a task ("Failed to apply UDF transform after 1/1
# attempts ... if you believe this to be transient."): about Ray's retries, not about the user's input.
_RAY_DATA_RETRY_NOTE = re.compile(r"\nFailed to .+? after \d+/\d+ attempts \(total backoff .*\Z", re.DOTALL)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that describe the user's input (data, configuration), whose message alone is the report."""
    from vembed.config import ConfigError
    from vembed.data.batching import BadRecordError
    from vembed.data.images import BadImageError
    from vembed.data.readers import EmptyDatasetError, RecordFileError
    from vembed.data.records import RecordError

    return (BadRecordError, RecordError, RecordFileError, EmptyDatasetError, BadImageError, ConfigError)


def wrapped_exceptions(exc: BaseException, context: bool = True) -> Iterator[BaseException | None]:
    """The exceptions ``exc`` wraps: Python's chain (``__context__`` too unless ``context=False``) plus the
    attributes Ray keeps the original in."""
    yield exc.__cause__
    if context:
        yield exc.__context__
    yield getattr(exc, "cause", None)  # RayTaskError
    yield getattr(exc, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
    yield getattr(exc, "controller_failure", None)  # Ray Train's ControllerError
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError: {rank: exception}
    if isinstance(failures, dict):
        yield from (failures[rank] for rank in sorted(failures))


def find_wrapped(
    exc: BaseException, match: Callable[[BaseException], bool], context: bool = True
) -> BaseException | None:
    """The first exception, breadth first from ``exc`` itself through :func:`wrapped_exceptions`, that ``match``
    accepts (None when none does)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if match(current):
            return current
        pending.extend(wrapped_exceptions(current, context))
    return None


def user_error(exc: BaseException) -> BaseException | None:
    """The vembed data or configuration error that ``exc`` (a Ray failure, or any exception) was caused by.

    Returns a fresh instance of the original type and message, without Ray's wrapper classes (Ray makes
    ``RayTaskError(BadRecordError)`` hybrids whose message is the remote traceback), or None when the failure was
    not caused by such an error (a bug, an OOM, a lost node: then Ray's own report is the useful one).
    """
    from ray.exceptions import RayError

    user_types = _user_error_types()
    found = find_wrapped(exc, lambda e: isinstance(e, user_types) and not isinstance(e, RayError))
    if found is None:
        return None
    args = found.args
    if args and isinstance(args[0], str):
        args = (_RAY_DATA_RETRY_NOTE.sub("", args[0]), *args[1:])
    try:
        return type(found)(*args)
    except TypeError:  # a subclass with another constructor: the instance itself
        return found


def raise_user_error(exc: BaseException) -> None:
    """Raise :func:`user_error` of ``exc`` alone (no Ray traceback chained to it) when there is one; else return,
    for the caller to re-raise ``exc`` itself. Used at the API edge: ``run_training`` (hence
    ``VEmbedFactoryTrainer.train``, ``vembed train``, ``ray_jobs/train.py``) and the training workers' data loader."""
    error = user_error(exc)
    if error is not None:
        raise error from None
