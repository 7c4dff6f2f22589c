"""Every numeric option of every command has one declared range (lggdeploy/common/options.py), checked before any
work: NaN, infinities, negatives, zero, huge values and wrong types are one line on stderr, exit 2, no traceback and
nothing written — driven over every command with Hypothesis."""

from __future__ import annotations

import contextlib
import math
import tempfile
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.common.options import LIST_RANGES, range_of

runner = CliRunner()


def _commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _numeric_options():
    """(command words, function name, option name, int or float, its flag) for every numeric option."""
    found = []
    for words, command in _commands():
        function = getattr(command.callback, "__wrapped__", command.callback)
        hints = typing.get_type_hints(function)
        for param in command.params:
            hint = hints.get(param.name)
            kinds = [hint] if hint in (int, float) else [a for a in typing.get_args(hint) if a in (int, float)]
            if kinds and not param.is_flag and param.param_type_name == "option":
                flag = max(param.opts, key=len)
                found.append((words, function.__name__, param.name, kinds[0], flag))
    return found


NUMERIC = _numeric_options()


def _required_args(command_words, tested: str) -> list[str]:
    """A command line that satisfies the parser apart from the tested option: paths that do not exist, a preset."""
    command = dict(_commands())[tuple(command_words)]
    args: list[str] = []
    for param in command.params:
        if param.name == tested or not param.required:
            continue
        value = "pspnet-scratch" if param.name == "model" else "0.5" if param.name == "ratio" else "missing"
        args += [value] if param.param_type_name == "argument" else [max(param.opts, key=len), value]
    return args


def test_every_numeric_option_has_a_declared_range():
    assert len(NUMERIC) > 50
    missing = [f"{' '.join(w)} {flag}" for w, fn, name, _, flag in NUMERIC if range_of(fn, name) is None]
    assert not missing, f"no range declared for: {missing}"
    list_options = {"batch_sizes", "prune_ratios", "ratios"}
    assert list_options <= set(LIST_RANGES)


def _refused(tmp_path: Path, words, fn, name, kind, flag, text: str) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    with contextlib.chdir(folder):
        before = set(Path(folder).rglob("*"))
        result = runner.invoke(app, [*words, *_required_args(words, name), flag, text])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, (words, flag, text, result.output)
        assert len(lines) == 1 and "Traceback" not in result.output, (words, flag, text, result.output)
        assert flag in lines[0], (words, flag, text, lines[0])  # refused for this option, not for a missing path
        assert set(Path(folder).rglob("*")) == before, (words, flag, text, "wrote files")


def _invalid(fn: str, name: str, kind: type, value: float) -> bool:
    if kind is int and isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return True  # not an integer at all: the parser refuses it
    return not range_of(fn, name).contains(int(value) if kind is int else value)


EDGE_VALUES = [math.nan, math.inf, -math.inf, -1, 0, 10**12]


@pytest.mark.parametrize(
    ("words", "fn", "name", "kind", "flag"), NUMERIC, ids=[f"{' '.join(n[0])}{n[4]}" for n in NUMERIC]
)
def test_each_numeric_option_refuses_its_edge_values_in_one_line(tmp_path, words, fn, name, kind, flag):
    for value in EDGE_VALUES:
        if _invalid(fn, name, kind, value):
            _refused(tmp_path, words, fn, name, kind, flag, str(value))
    _refused(tmp_path, words, fn, name, kind, flag, "abc")  # a wrong type


@pytest.mark.slow  # 150 drawn values; every option's edges stay in the default set
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from(NUMERIC),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**15), max_value=10**15),
        st.text(min_size=1, max_size=6).filter(lambda t: not t.startswith("-")),
    ),
)
def test_any_value_outside_a_declared_range_is_refused_before_any_work(tmp_path, option, value):
    words, fn, name, kind, flag = option
    if isinstance(value, str):
        try:
            parsed = kind(value)
        except ValueError:
            parsed = None
        assume(parsed is None)  # a string that is no number of its kind: the parser's one line
    else:
        assume(_invalid(fn, name, kind, float(value) if kind is float else value))
    _refused(tmp_path, words, fn, name, kind, flag, str(value))
