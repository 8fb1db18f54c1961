import json
import subprocess
import sys

import pytest

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


def test_engine_layout_setting(monkeypatch):
    assert load_settings().engine.layout == "in_process"  # the measured default (docs/engine.md)
    monkeypatch.setenv("LKSERVE_ENGINE__LAYOUT", "multiprocess")
    assert load_settings().engine.layout == "multiprocess"
    monkeypatch.setenv("LKSERVE_ENGINE__TENSOR_PARALLEL_SIZE", "2")
    assert load_settings().engine.tensor_parallel_size == 2
    monkeypatch.setenv("LKSERVE_ENGINE__LAYOUT", "in_process")  # one worker cannot span two GPUs
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs engine.layout=multiprocess"):
        load_settings()
    monkeypatch.setenv("LKSERVE_ENGINE__LAYOUT", "threads")
    with pytest.raises(ValueError, match="layout"):
        load_settings()


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


@pytest.mark.parametrize("suffix,text", [
    (".toml", "cache_dir = '{d}'\n[engine]\nnum_speculative_tokens = 6\n[gateway]\nport = 9001\n"),
    (".json", '{{"cache_dir": "{d}", "engine": {{"num_speculative_tokens": 6}}, "gateway": {{"port": 9001}}}}'),
    (".yaml", "cache_dir: {d}\nengine:\n  num_speculative_tokens: 6\ngateway:\n  port: 9001\n"),
])
def test_config_file_and_precedence(monkeypatch, tmp_path, suffix, text):
    path = tmp_path / f"lkserve{suffix}"
    path.write_text(text.format(d=tmp_path / "cache"))
    monkeypatch.setenv("LKSERVE_CONFIG", str(path))
    monkeypatch.delenv("LKSERVE_CACHE_DIR", raising=False)
    s = load_settings()
    assert (s.engine.num_speculative_tokens, s.gateway.port, s.cache_dir) == (6, 9001, tmp_path / "cache")
    monkeypatch.setenv("LKSERVE_GATEWAY__PORT", "9002")  # environment beats the file
    assert load_settings().gateway.port == 9002
    assert load_settings(gateway={"port": 9003}).gateway.port == 9003  # explicit (CLI flags) beat both
    assert load_settings().engine.num_speculative_tokens == 6  # untouched fields still come from the file


def test_config_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("LKSERVE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        load_settings()
    (tmp_path / "c.ini").write_text("x")
    monkeypatch.setenv("LKSERVE_CONFIG", str(tmp_path / "c.ini"))
    with pytest.raises(ValueError, match="not .toml"):
        load_settings()


def test_cli_config_flag_and_bench():
    from pathlib import Path

    toml = Path(__file__).parent / "data-cli-config.toml"
    toml.write_text("[engine]\nnum_speculative_tokens = 7\n")
    try:
        out = subprocess.run([sys.executable, "-m", "lkserve.cli", "--config", str(toml), "config", "show"],
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out)["engine"]["num_speculative_tokens"] == 7
    finally:
        toml.unlink()
    run = subprocess.run([sys.executable, "-m", "lkserve.cli", "bench", "engine", "--help"], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 0 and "--prompts" in run.stdout


def test_worker_config_follows_the_engine_method_and_its_learning_rate(tmp_path):
    from lkserve.config import EngineSettings, Settings, TrainerSettings
    from lkserve.trainer.drafts import ops_for
    from lkserve.trainer.worker import resolve_models

    def resolved(settings):
        s = resolve_models(settings)
        return s.engine.method, s.engine.draft_model, s.engine.target_model, ops_for(s).lr

    head = Settings(cache_dir=tmp_path, engine=EngineSettings(method="eagle3", target_model="/m/target",
                                                              draft_model="/m/head"))
    assert resolved(head) == ("eagle3", "/m/head", "/m/target", 1e-3)
    model = Settings(cache_dir=tmp_path, engine=EngineSettings(draft_model="/m/draft"))
    assert resolved(model) == ("draft_model", "/m/draft", None, 3e-3)
    explicit = head.model_copy(update={"trainer": TrainerSettings(lr=5e-4)})
    assert resolved(explicit)[3] == 5e-4


def test_trainer_settings_from_env_and_file(monkeypatch, tmp_path):
    """The worker's knobs follow the same precedence as every section: flags > environment > file > defaults,
    and enum-like fields refuse unknown names."""
    path = tmp_path / "lkserve.toml"
    path.write_text("[trainer]\nloss = 'kl'\ngate_metric = 'tau'\nbatch_positions = 64\n")
    monkeypatch.setenv("LKSERVE_CONFIG", str(path))
    monkeypatch.setenv("LKSERVE_TRAINER__BATCH_POSITIONS", "128")
    t = load_settings().trainer
    assert (t.loss, t.gate_metric, t.batch_positions, t.fresh_threshold()) == ("kl", "tau", 128, 64)
    assert load_settings(trainer={"batch_positions": 32}).trainer.batch_positions == 32
    monkeypatch.setenv("LKSERVE_TRAINER__LOSS", "mse")
    with pytest.raises(ValueError, match="loss"):
        load_settings()


def test_k_defaults_per_device_kind_and_method(monkeypatch):
    """Unset, K is the measured one for the device and method (on this CPU: 2 for a draft, 4 for ngram); set, it wins
    (env, file or keyword), and the value is a plain int the engine and the worker both read."""
    from lkserve.config import DEFAULT_K, EngineSettings, device_kind

    monkeypatch.delenv("LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS", raising=False)
    kind = device_kind()
    for method in ("draft_model", "eagle3", "ngram"):
        assert EngineSettings(method=method).num_speculative_tokens == DEFAULT_K[kind][method]
    if kind == "cpu":
        assert (DEFAULT_K["cpu"]["draft_model"], DEFAULT_K["cpu"]["eagle3"], DEFAULT_K["cpu"]["ngram"]) == (2, 2, 4)
    assert EngineSettings(method="eagle3", num_speculative_tokens=5).num_speculative_tokens == 5
    assert load_settings().engine.num_speculative_tokens == DEFAULT_K[kind]["draft_model"]
    monkeypatch.setenv("LKSERVE_ENGINE__NUM_SPECULATIVE_TOKENS", "3")
    assert load_settings().engine.num_speculative_tokens == 3
