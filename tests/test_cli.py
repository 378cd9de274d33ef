"""The ``vembed`` command line as a user meets it: a user error is one line on stderr and exit code 2 (no
traceback), ``--version`` and ``-v/--log-level`` work, and every ``--help`` shows defaults without markup."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vembed import __version__
from vembed.cli import SUBCOMMANDS, build_parser

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def _vembed(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vembed.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _bad_command_lines(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, a phrase the one-line error must contain)."""
    missing = str(tmp / "no-such-model")
    data = tmp / "train.jsonl"
    data.write_text('{"query": "a", "positive": "b"}\n')
    model = tmp / "model"
    model.mkdir()
    return [
        (["train", "--config_override", "learning_rat=1e-4"], "did you mean 'learning_rate'"),
        (["train", str(tmp / "missing.yaml")], "config file not found"),
        (["train", "--config_override", "batch_size=abc"], "'batch_size' in --config_override expects int"),
        (["train", "--config_override", f"model_name={missing}", f"data_path={data}"], "model_name: model path"),
        (["train", "--config_override", f"model_name={model}", f"data_path={tmp / 'nope.jsonl'}"], "data_path"),
        (["embed", "--model", str(model), "--output", str(tmp / "out")], "required: --input"),
        (["embed", "--model", missing, "--input", str(tmp), "--output", str(tmp / "out")], "model path not found"),
        (["serve", "--model", missing], "model path not found"),
        (["serve", "--model", str(model), "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"], "not both"),
        (["evaluate", "--model", str(model), "--data", str(tmp / "nope.jsonl")], "not found"),
        (["demo", "--epochs", "x"], "invalid int value"),
        (["train", "--log-level", "loud"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ]


def test_every_user_error_is_one_line_on_stderr_and_exit_2(tmp_path):
    table = _bad_command_lines(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda row: _vembed(*row[0]), table))
    for (argv, phrase), done in zip(table, results, strict=True):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (argv, done.returncode, done.stderr)
        assert len(lines) == 1, (argv, done.stderr)
        assert lines[0].startswith("vembed") and ": error: " in lines[0], (argv, lines)
        assert phrase in lines[0], (argv, lines[0])
        assert "Traceback" not in done.stderr + done.stdout


def test_version_and_verbose_flags():
    done = _vembed("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"vembed {__version__}"
    args = build_parser().parse_args(["train", "-v"])
    assert args.log_level == "debug"
    args = build_parser().parse_args(["--log-level", "warning", "serve", "--model", "m"])
    assert args.log_level == "warning"


def test_a_user_error_shows_its_traceback_with_verbose(tmp_path):
    done = _vembed("train", "-v", str(tmp_path / "missing.yaml"))
    assert done.returncode != 0 and "Traceback" in done.stderr and "config file not found" in done.stderr


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_shows_defaults_and_no_markup(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command] if command else parser  # type: ignore[union-attr]
    text = sub.format_help()
    assert "`" not in text and ":class:" not in text and ":func:" not in text
    for action in sub._actions:
        if action.option_strings and action.default not in (None, False, [], "==SUPPRESS==") and action.help:
            flag = action.option_strings[-1]
            assert "(default" in action.help or "%(default)" in sub.formatter_class(sub.prog)._get_help_string(
                action
            ), f"{command} {flag} does not show its default"


def test_a_user_error_wrapped_by_ray_train_is_found():
    from ray.train import WorkerGroupError

    from vembed.clierrors import find_user_error
    from vembed.data.records import RecordError

    bad = RecordError("bad record 'x' at data.jsonl:3: positive is missing")
    try:
        raise RuntimeError("worker died") from bad
    except RuntimeError as worker:
        failed = WorkerGroupError("training failed", {0: worker})
    assert find_user_error(failed) is bad
    assert find_user_error(WorkerGroupError("training failed", {0: TypeError("a bug")})) is None
