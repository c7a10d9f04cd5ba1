"""Sweep jobs record their failures instead of raising them (the CLI sweep itself: test_cli_errors.py)."""

import pytest

from cl_runner import sweep
from cl_runner.errors import RunDirectoryBusy, UserError


@pytest.fixture(autouse=True)
def fresh_outcomes(monkeypatch):
    monkeypatch.setattr(sweep, "OUTCOMES", [])
    monkeypatch.delenv("CL_RUNNER_DEBUG", raising=False)


def fail(exc):
    def job():
        raise exc

    return job


def test_a_crash_is_recorded_with_its_type_and_the_sweep_goes_on(tmp_path, capsys):
    sweep.run_job(fail(RuntimeError("CUDA out of memory\nmore detail")), tmp_path / "a")
    sweep.run_job(lambda: None, tmp_path / "b")
    assert (tmp_path / "a" / "error.txt").read_text() == "RuntimeError: CUDA out of memory\n"
    assert capsys.readouterr().err == f"cl-runner: error: job {tmp_path / 'a'}: RuntimeError: CUDA out of memory\n"
    assert sweep.failure_summary() == f"cl-runner: 1 of 2 jobs failed (reasons in their error.txt): {tmp_path / 'a'}"


def test_debug_puts_the_traceback_in_error_txt(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_RUNNER_DEBUG", "1")
    sweep.run_job(fail(UserError("replay.ratio must be in (0, 1)")), tmp_path)
    text = (tmp_path / "error.txt").read_text()
    assert text.startswith("replay.ratio must be in (0, 1)\n") and "Traceback (most recent call last)" in text


def test_a_busy_directory_is_not_marked_failed(tmp_path):
    """The directory belongs to the live process that holds it: no error.txt is written there."""
    sweep.run_job(fail(RunDirectoryBusy("in use")), tmp_path)
    assert not (tmp_path / "error.txt").exists()
    assert sweep.failure_summary().startswith("cl-runner: 1 of 1 jobs failed")


def test_ctrl_c_ends_the_sweep(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        sweep.run_job(fail(KeyboardInterrupt()), tmp_path)


def test_all_good_means_no_summary(tmp_path):
    sweep.run_job(lambda: None, tmp_path)
    assert sweep.failure_summary() is None
