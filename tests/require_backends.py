"""pytest plugin: with --require-backends, fail unless PostgreSQL and S3 tests really ran.

CI must not go green because a service was missing and its tests quietly skipped.
"""

from __future__ import annotations

import pytest

REQUIRED_MARKS = ("postgres", "s3")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-backends",
        action="store_true",
        help="fail the session if any postgres or s3 test was skipped, or none ran",
    )


class _Tally:
    def __init__(self) -> None:
        self.ran = dict.fromkeys(REQUIRED_MARKS, 0)
        self.skipped: list[str] = []


_tally = _Tally()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    marks = [mark for mark in REQUIRED_MARKS if mark in report.keywords]
    if not marks:
        return
    if report.skipped:
        _tally.skipped.append(report.nodeid)
    elif report.when == "call":
        for mark in marks:
            _tally.ran[mark] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--require-backends"):
        return
    problems = [f"no {mark} test ran" for mark, count in _tally.ran.items() if count == 0]
    if _tally.skipped:
        problems.append(f"{len(_tally.skipped)} postgres/s3 tests skipped: {_tally.skipped[:5]}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("--require-backends: " + "; ".join(problems), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = ", ".join(f"{mark}: {count}" for mark, count in _tally.ran.items())
    terminalreporter.write_line(f"backend tests that ran: {counts}")
