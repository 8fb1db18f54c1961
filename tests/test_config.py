import json
import subprocess
import sys

from lkserve.config import load_settings


def test_env_vars_reach_nested_sections(monkeypatch, tmp_path):
    monkeypatch.setenv("LKSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS", "6")
    monkeypatch.setenv("LKSERVE_REDIS__URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("LKSERVE_CAPTURE__SAMPLE_RATE", "0.25")
    settings = load_settings()
    assert settings.cache_dir == tmp_path
    assert settings.engine.num_speculative_tokens == 6
    assert settings.redis.url == "redis://127.0.0.1:1/0"
    assert settings.capture.sample_rate == 0.25


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("LKSERVE_CAPTURE__SAMPLE_RATE", "1.5")
    try:
        load_settings()
    except ValueError as exc:
        assert "sample_rate" in str(exc)
    else:
        raise AssertionError("a sample rate above 1 must be refused")


def test_cli_config_show_prints_effective_json(monkeypatch):
    env = {"LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS": "5", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "lkserve.cli", "config", "show"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["engine"]["num_speculative_tokens"] == 5


def test_default_cache_dir_follows_lkserve_cache_dir(monkeypatch, tmp_path):
    """The engine resolves the default models without Settings: it must agree with Settings.cache_dir."""
    from lkserve.config import default_cache_dir

    monkeypatch.setenv("LKSERVE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" == load_settings().cache_dir
    monkeypatch.delenv("LKSERVE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lkserve" == load_settings().cache_dir
