"""Start-up work in the server process that must never stop it."""

from forcedphot.api.runtime import ServiceRuntime


def test_a_failing_warm_up_is_logged_not_raised(monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr("forcedphot.api.runtime.exercise_measurement", fail)
    ServiceRuntime._exercise()
    assert "warm-up measurement failed" in caplog.text and "no space left" in caplog.text
