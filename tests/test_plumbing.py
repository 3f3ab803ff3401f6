"""CLI plumbing: a command whose module fails to import names the missing piece; progress output per destination."""
from __future__ import annotations

import os
import time

import click
import pytest
from click.testing import CliRunner

from fvtrust import progress as P
from fvtrust.commands import register_commands


def test_command_whose_module_fails_to_import_is_an_error_naming_it():
    @click.group()
    def g():
        pass

    register_commands(g, [("ok", "fvtrust.theory.cli", "theory_command"),
                          ("gone", "fvtrust_no_such_module.cli", "command"),
                          ("noattr", "fvtrust.theory.cli", "no_such_attribute")])
    assert set(g.commands) == {"ok", "gone", "noattr"}
    assert "UNAVAILABLE" in CliRunner().invoke(g, ["--help"]).output
    from fvtrust.cli import _Group

    g.__class__ = _Group  # fvtrust's error handling
    r = CliRunner().invoke(g, ["gone", "--any", "args"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "fvtrust: error: `gone` is unavailable: importing fvtrust_no_such_module.cli failed (missing module "
        "'fvtrust_no_such_module'); install the missing package or reinstall fvtrust"]
    r = CliRunner().invoke(g, ["noattr"])
    assert r.exit_code == 2 and "AttributeError" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_every_real_command_imports_here():
    from fvtrust.cli import main

    def walk(group):
        for c in group.commands.values():
            yield from walk(c) if isinstance(c, click.Group) else [c]

    broken = [c.name for c in walk(main) if (c.help or "").startswith("UNAVAILABLE")]
    assert broken == []


def _loop(n=40, pause=0.005):
    for _ in P.progress(range(n), desc="work", unit="item"):
        time.sleep(pause)


def test_log_mode_writes_whole_lines(monkeypatch, capsys):
    monkeypatch.setenv("FVTRUST_PROGRESS", "log")
    monkeypatch.setenv("FVTRUST_PROGRESS_INTERVAL", "0.05")
    _loop()
    bar = P.progress(total=5, desc="manual")
    for _ in range(5):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("manual: 100% 5/5")
    work = [ln for ln in lines if ln.startswith("work:")]
    assert len(work) >= 2 and work[-1].startswith("work: 100% 40/40")


def test_non_terminal_defaults_to_log_and_zero_silences(monkeypatch, capsys):
    monkeypatch.delenv("FVTRUST_PROGRESS", raising=False)
    assert P.mode() == "log"  # pytest's stderr is not a terminal
    monkeypatch.setenv("FVTRUST_PROGRESS", "0")
    assert P.mode() == "off"
    _loop(5, 0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("shown", ["0", "log"])
def test_progress_events_are_reported_whether_or_not_bars_show(shown, monkeypatch, capsys):
    r, w = os.pipe()
    monkeypatch.setenv("FVTRUST_PROGRESS", shown)
    monkeypatch.setenv("FVTRUST_EVENTS_FD", str(w))
    monkeypatch.setattr(P, "_events_checked", False)
    try:
        _loop(3, 0)
        P.event("cache-write", "/x")
    finally:
        os.close(w)
        monkeypatch.setattr(P, "_events_checked", False)
        monkeypatch.setattr(P, "_events_fd", None)
    with os.fdopen(r) as f:
        events = f.read().splitlines()
    assert events == ["progress\twork\t1"] * 3 + ["cache-write\t/x"]
