"""A native oracle that crashes fails one test, and the suite goes on to print its summary."""

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from isolation import ChildCrashed, ChildError, call_in_child

TESTS = Path(__file__).parent


def test_result_comes_back():
    assert call_in_child(divmod, 17, 5) == (3, 2)


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV, signal.SIGABRT])
def test_child_killed_by_a_signal_is_a_failure_naming_signal_and_call(sig):
    with pytest.raises(ChildCrashed, match=rf"signal\.raise_signal\(<Signals\.{sig.name}: {sig.value}>\) "
                                           rf"crashed the child interpreter: killed by signal {sig.name}"):
        call_in_child(signal.raise_signal, sig)


def test_exception_in_child_comes_back_with_its_traceback():
    with pytest.raises(ChildError, match=r"(?s)(os|posix)\.listdir\('/no/such/folder'\) raised in the child:.*"
                                         r"FileNotFoundError"):
        call_in_child(os.listdir, "/no/such/folder")


def test_child_past_its_timeout_is_killed():
    import time

    with pytest.raises(ChildCrashed, match=r"time\.sleep\(30\) did not finish within 1 s"):
        call_in_child(time.sleep, 30, timeout=1)


def test_a_crash_fails_one_test_and_the_run_prints_its_summary(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *sys.path]))
    pytester.makepyfile(test_crashing_oracle=textwrap.dedent("""
        import signal
        from isolation import call_in_child

        def test_before():
            assert True

        def test_oracle_dies_by_sigill():
            call_in_child(signal.raise_signal, signal.SIGILL)

        def test_after():
            assert call_in_child(abs, -3) == 3
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*ChildCrashed*killed by signal SIGILL*", "*1 failed, 2 passed*"])
