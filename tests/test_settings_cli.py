"""Settings profiles, environment overrides, secret masking, and the CLI's behaviour on bad input."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from retrieval_core.cli import app, main
from retrieval_core.settings import PROJECT_ROOT, Settings, get_settings


def test_local_profile_is_embedded() -> None:
    s = Settings(profile="local")
    assert (s.dbt_target, s.offline_store, s.online_store, s.kfp.mode) == ("duckdb", "duckdb", "sqlite", "local")
    # Milvus Lite as a server on loopback, started on demand (the API and the refresh job share it)
    assert s.milvus.uri.startswith("http://127.0.0.1:") and s.milvus.embedded_server
    assert s.serving.host == "127.0.0.1"
    assert s.data_dir == PROJECT_ROOT / "data"


def test_production_profile_uses_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UER_PROFILE", "production")
    s = Settings()
    assert (s.dbt_target, s.offline_store, s.online_store, s.kfp.mode) == ("postgres", "postgres", "redis", "cluster")
    assert s.milvus.uri.startswith("http://127.0.0.1") and not s.milvus.embedded_server


def test_environment_overrides_profile_defaults_including_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UER_PROFILE", "production")
    monkeypatch.setenv("UER_ONLINE_STORE", "sqlite")
    monkeypatch.setenv("UER_POSTGRES__HOST", "db.internal")
    monkeypatch.setenv("UER_MILVUS__URI", "http://milvus:19530")
    s = Settings()
    assert s.online_store == "sqlite" and s.offline_store == "postgres"
    assert s.postgres.host == "db.internal" and s.milvus.uri == "http://milvus:19530"


def test_unknown_profile_and_unknown_setting_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="unknown profile"):
        Settings(profile="staging")
    with pytest.raises(ValidationError):
        Settings(onlin_store="redis")


def test_settings_command_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UER_POSTGRES__PASSWORD", "hunter2-very-secret")
    monkeypatch.setenv("UER_SERVING__API_KEY", "key-abc-123")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["settings"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "hunter2-very-secret" not in result.output and "key-abc-123" not in result.output
    shown = json.loads(result.output)
    assert shown["postgres"]["password"] == "**********"
    assert shown["profile"] == "local"


def test_dsn_carries_the_secret_only_when_asked() -> None:
    s = Settings(postgres={"password": "pw"})
    assert s.postgres.dsn() == "postgresql://postgres:pw@127.0.0.1:5432/uer"
    assert "pw" not in repr(s)


def test_simulate_command_rejects_bad_knobs() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--world", "tiny", "--set", "tail_gap_rate=1.7"])
    assert result.exit_code != 0
    assert "tail_gap_rate" in result.output
    result = runner.invoke(app, ["simulate", "--world", "galaxy"])
    assert result.exit_code != 0 and "unknown world" in result.output


def test_land_command_reports_rejection_with_exit_code_2(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UER_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    bad = tmp_path / "bad.parquet"
    bad.write_text("nope")
    try:
        misdated = CliRunner().invoke(app, ["land", "events", "2026-13-01", str(bad)])  # refused before it is read
        result = CliRunner().invoke(app, ["land", "events", "2026-10-01", str(bad)])
    finally:
        get_settings.cache_clear()
    # a usage error (exit code 2), not a traceback (1); typer boxes and wraps the message
    assert misdated.exit_code == 2 and "mustbeYYYY-MM-DD" in re.sub(r"[\s│╭╮╰╯─]+", "", misdated.output)
    assert result.exit_code == 2
    assert "rejected" in result.output and "readable parquet" in result.output
    assert (tmp_path / "data" / "quarantine" / "events" / "ds=2026-10-01" / "reason.json").exists()


def test_train_command_is_refused_with_exit_code_3_while_another_run_holds_the_lock(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    from training.pipeline import local_run_lock

    monkeypatch.setenv("UER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("UER_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    get_settings.cache_clear()
    held, done = threading.Event(), threading.Event()

    def other_run() -> None:  # the lock is held by another thread, as by another process
        with local_run_lock(get_settings()):
            held.set()
            done.wait(60)

    holder = threading.Thread(target=other_run)
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(SystemExit) as exited:
            main(["train", "--version", "by-hand"])
    finally:
        done.set()
        holder.join()
        get_settings.cache_clear()
    assert exited.value.code == 3
    printed = capsys.readouterr().err
    assert "another local training run holds" in printed and "Traceback" not in printed
    assert not (tmp_path / "artifacts" / "kfp" / "by-hand").exists()


def test_an_operator_error_is_its_message_and_exit_code_3_not_a_traceback(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``uer index publish`` of a version that is not registered: the stage raises ModelNotFound, which says what
    to do; the person sees that line, not forty lines of frames. Refused before the engine is touched: an embedded
    Milvus Lite server started for it would outlive the command."""
    monkeypatch.setenv("UER_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("UER_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main(["index", "publish", "--model-version", "no-such-version"])
    finally:
        get_settings.cache_clear()
    assert exited.value.code == 3
    printed = capsys.readouterr().err
    assert printed.startswith("error ") and "no-such-version" in printed and "Traceback" not in printed
    assert not (tmp_path / "data" / "milvus").exists()  # no server was started for it
