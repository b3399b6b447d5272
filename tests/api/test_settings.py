"""Settings sources (keyword > environment > file), their errors, and ``serve`` refusing unusable ones."""

import pytest

from forcedphot.api.settings import Settings, SettingsError, load_settings


def test_settings_from_environment_lists_and_precedence(tmp_path, monkeypatch):
    config = tmp_path / "forcedphot.toml"
    config.write_text('max_objects = 10\ncache_bytes = 1234\npath_template = "{datasetType}/{visit}-{detector}.fits"\n')
    monkeypatch.setenv("FORCEDPHOT_CONFIG_FILE", str(config))
    monkeypatch.setenv("FORCEDPHOT_REPOSITORY_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    monkeypatch.setenv("FORCEDPHOT_API_KEYS", "k" * 16 + "," + "j" * 16)
    monkeypatch.setenv("FORCEDPHOT_MAX_OBJECTS", "20")
    settings = load_settings(cache_bytes=99, port=None)  # keyword > env > file; None means unset
    assert settings.repository_roots == [tmp_path / "a", tmp_path / "b"]
    assert [k.get_secret_value() for k in settings.api_keys] == ["k" * 16, "j" * 16]
    assert (settings.max_objects, settings.cache_bytes) == (20, 99)
    assert settings.path_template == "{datasetType}/{visit}-{detector}.fits"
    assert not settings.demo_mode


def test_settings_json_file_and_errors(tmp_path, monkeypatch):
    config = tmp_path / "settings.json"
    config.write_text('{"demo_size": 512, "backend": "numpy"}')
    assert Settings(config_file=config).demo_size == 512
    config.write_text("{broken")
    with pytest.raises(SettingsError, match="settings.json"):
        load_settings(config_file=config)
    monkeypatch.setenv("FORCEDPHOT_REPOSITORY_ROOTS", str(tmp_path))
    with pytest.raises(SettingsError, match="API keys are required"):
        load_settings()
    with pytest.raises(SettingsError, match="at least 16"):
        load_settings(api_keys="short")
    with pytest.raises(SettingsError, match="max_objects"):
        load_settings(api_keys="x" * 16, max_objects=0)
    with pytest.raises(SettingsError, match="must use the field"):
        load_settings(api_keys="x" * 16, path_template="{visit}.fits")
    with pytest.raises(SettingsError, match="unknown_setting|extra"):
        load_settings(api_keys="x" * 16, unknown_setting=1)


def test_serve_refuses_unusable_settings_with_exit_code_2(tmp_path, monkeypatch, capsys):
    from forcedphot.cli import main

    monkeypatch.setenv("FORCEDPHOT_REPOSITORY_ROOTS", "")  # restored afterwards: serve writes it
    monkeypatch.delenv("FORCEDPHOT_API_KEYS", raising=False)
    assert main(["serve", "--repository", str(tmp_path), "--host", "127.0.0.1"]) == 2
    refused = capsys.readouterr().err  # issue 23, item 12: says why on 127.0.0.1 too, and how
    assert "API keys are required when serving a repository, on any address" in refused and "openssl rand -hex 16" in refused
    assert "Value error" not in refused and "Authorization: Bearer" in refused
    monkeypatch.setenv("FORCEDPHOT_API_KEYS", "k" * 16)
    assert main(["serve", "--repository", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    monkeypatch.setenv("FORCEDPHOT_BACKEND", "cupy")
    assert main(["serve", "--repository", str(tmp_path)]) == 2
    assert "cupy" in capsys.readouterr().err
