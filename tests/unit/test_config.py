import json

import pytest
from pydantic import ValidationError

from app.config import Settings


def test_defaults_match_the_documented_contract(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("RECIPROCAM_"):
            monkeypatch.delenv(key)
    settings = Settings()
    assert [(m.name, m.weights) for m in settings.models] == [
        ("deit_small", "hub"),
        ("shapes", "app/weights/shapes_vit.safetensors"),
    ]
    assert settings.models[0].arch == "deit_small_patch16_224" and settings.models[1].arch is None
    assert settings.batch.max_batch_images == 32 and settings.batch.max_wait_ms == 5
    assert settings.batch.max_queue_images == 256
    assert settings.limits.max_body_bytes == 20 * 1024 * 1024 and settings.limits.max_pixels == 40_000_000
    assert settings.limits.max_images_per_request == 16
    assert settings.auth.api_keys == [] and settings.cors.allow_origins == []
    assert settings.drain_timeout_s == 25
    assert settings.cuda_wait == "block"


def test_file_then_env_then_indexed_model_overrides(tmp_path, monkeypatch):
    config = tmp_path / "service.json"
    config.write_text(
        json.dumps(
            {
                "batch": {"max_wait_ms": 7, "max_batch_images": 16},
                "models": [
                    {"name": "a", "arch": "deit_tiny_patch16_224", "weights": "random:0"},
                    {"name": "b", "weights": "b.safetensors"},
                ],
            }
        )
    )
    monkeypatch.setenv("RECIPROCAM_CONFIG_FILE", str(config))
    monkeypatch.setenv("RECIPROCAM_BATCH__MAX_BATCH_IMAGES", "4")
    monkeypatch.setenv("RECIPROCAM_MODELS__1__WEIGHTS", "/models/b.safetensors")
    monkeypatch.setenv("RECIPROCAM_MODELS__0__MODEL_KWARGS", '{"img_size": 32}')
    monkeypatch.setenv("RECIPROCAM_AUTH__API_KEYS", "first, second")
    monkeypatch.setenv("RECIPROCAM_CORS__ALLOW_ORIGINS", '["https://app.example"]')
    monkeypatch.setenv("RECIPROCAM_CUDA_WAIT", "spin")
    settings = Settings()
    assert settings.cuda_wait == "spin"
    assert settings.batch.max_wait_ms == 7  # from the file
    assert settings.batch.max_batch_images == 4  # the environment wins over the file
    assert [m.name for m in settings.models] == ["a", "b"]
    assert settings.models[1].weights == "/models/b.safetensors"
    assert settings.models[0].model_kwargs == {"img_size": 32}
    assert settings.models[0].weights == "random:0"
    assert [key.get_secret_value() for key in settings.auth.api_keys] == ["first", "second"]
    assert "first" not in repr(settings.auth)  # keys never show up in logs or reprs
    assert settings.cors.allow_origins == ["https://app.example"]


def test_yaml_file_and_model_list_from_env(tmp_path, monkeypatch):
    config = tmp_path / "service.yaml"
    config.write_text("drain_timeout_s: 3\nlimits:\n  max_pixels: 1000\n")
    monkeypatch.setenv("RECIPROCAM_CONFIG_FILE", str(config))
    monkeypatch.setenv(
        "RECIPROCAM_MODELS", json.dumps([{"name": "only", "weights": "random:1", "arch": "x"}])
    )
    settings = Settings()
    assert settings.drain_timeout_s == 3 and settings.limits.max_pixels == 1000
    assert [m.name for m in settings.models] == ["only"]


def test_invalid_settings_are_refused():
    with pytest.raises(ValidationError):
        Settings(models=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError):
        Settings(batch={"max_batch_images": 0})
    with pytest.raises(ValidationError):
        Settings(models=[{"name": "bad name/with slash"}])
    with pytest.raises(ValidationError):
        Settings(cuda_wait="yield")
    with pytest.raises(ValidationError):
        Settings(torch_threads=0)


def test_mistakes_in_settings_are_refused_at_start_up(tmp_path, monkeypatch):
    """A misspelt key in a config file, a device torch does not know and a malformed random:SEED
    are errors when the settings load, not silent defaults or failures later."""
    import json

    import pytest
    from pydantic import ValidationError

    from app.config import ModelSettings, Settings

    typo = tmp_path / "settings.json"
    typo.write_text(json.dumps({"batchs": {"max_batch_images": 4}}), encoding="utf-8")
    monkeypatch.setenv("RECIPROCAM_CONFIG_FILE", str(typo))
    with pytest.raises(ValidationError, match="batchs"):
        Settings()
    monkeypatch.delenv("RECIPROCAM_CONFIG_FILE")
    with pytest.raises(ValidationError, match="device 'gpu'"):
        ModelSettings(name="m", device="gpu")
    with pytest.raises(ValidationError, match="random:SEED"):
        ModelSettings(name="m", weights="random:abc")
    assert ModelSettings(name="m", device="cuda:1", weights="random:7").device == "cuda:1"
    assert Settings(log_level="DEBUG").log_level == "debug"
    with pytest.raises(ValidationError):
        Settings(log_level="verbose")


def test_indexed_model_kwargs_keep_their_json_types(monkeypatch):
    """RECIPROCAM_MODELS__0__MODEL_KWARGS__<KEY> feeds timm.create_model, which needs numbers and
    booleans, not their text; text that is not JSON stays a string."""
    from app.config import Settings

    monkeypatch.setenv("RECIPROCAM_MODELS__0__MODEL_KWARGS__IMG_SIZE", "64")
    monkeypatch.setenv("RECIPROCAM_MODELS__0__MODEL_KWARGS__CLASS_TOKEN", "false")
    monkeypatch.setenv("RECIPROCAM_MODELS__0__MODEL_KWARGS__GLOBAL_POOL", "avg")
    monkeypatch.setenv("RECIPROCAM_MODELS__0__TARGET_BLOCK", "-2")
    model = Settings().models[0]
    assert model.model_kwargs == {"img_size": 64, "class_token": False, "global_pool": "avg"}
    assert model.target_block == -2


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.upper().startswith("RECIPROCAM_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_a_model_object_without_brackets_is_refused_not_ignored(clean_env, tmp_path):
    from app.config import SettingsProblem, load_settings

    clean_env.setenv("RECIPROCAM_MODELS", '{"name": "x", "weights": "random:0"}')
    with pytest.raises(SettingsProblem) as info:
        load_settings()
    assert "RECIPROCAM_MODELS" in str(info.value) and "brackets" in str(info.value)
    assert '[{"name": "x", "weights": "random:0"}]' in str(info.value)  # what to write instead
    clean_env.delenv("RECIPROCAM_MODELS")
    config = tmp_path / "service.yaml"
    config.write_text("models:\n  name: x\n", encoding="utf-8")
    clean_env.setenv("RECIPROCAM_CONFIG_FILE", str(config))
    with pytest.raises(SettingsProblem, match=r"models in .*service\.yaml.*write a list"):
        load_settings()


def test_unknown_variables_are_refused_with_the_closest_valid_name(clean_env):
    from app.config import SettingsProblem, load_settings

    for wrong, right in [
        ("RECIPROCAM_DRAIN_TIMOUT_S", "RECIPROCAM_DRAIN_TIMEOUT_S"),
        ("RECIPROCAM_BATCH__MAX_WAT_MS", "RECIPROCAM_BATCH__MAX_WAIT_MS"),
        ("RECIPROCAM_MODELS__0__WIEGHTS", "RECIPROCAM_MODELS__0__WEIGHTS"),
        ("reciprocam_log_levle", "RECIPROCAM_LOG_LEVEL"),
    ]:
        clean_env.setenv(wrong, "3")
        with pytest.raises(SettingsProblem, match=rf"{wrong.upper()} is not a setting .did you mean {right}"):
            load_settings()
        clean_env.delenv(wrong)
    clean_env.setenv("RECIPROCAM_TEST_DELAY_FILE", "/tmp/x")  # the test suite's own variables pass
    clean_env.setenv("RECIPROCAM_DRAIN_TIMEOUT_S", "3")
    assert load_settings().drain_timeout_s == 3


def test_list_settings_take_commas_or_json_and_bad_json_says_what_to_write(clean_env):
    from app.config import SettingsProblem, load_settings

    clean_env.setenv("RECIPROCAM_CORS__ALLOW_ORIGINS", "https://a.example, https://b.example")
    clean_env.setenv("RECIPROCAM_LIMITS__ALLOWED_FORMATS", "PNG,JPEG")
    settings = load_settings()
    assert settings.cors.allow_origins == ["https://a.example", "https://b.example"]
    assert settings.limits.allowed_formats == ["PNG", "JPEG"]
    clean_env.setenv("RECIPROCAM_CORS__ALLOW_ORIGINS", '["https://a.example", ')
    with pytest.raises(SettingsProblem) as info:
        load_settings()
    message = str(info.value)
    assert "RECIPROCAM_CORS__ALLOW_ORIGINS" in message and "EnvSettingsSource" not in message
    assert "JSON list" in message and "separated by commas" in message
    clean_env.delenv("RECIPROCAM_CORS__ALLOW_ORIGINS")
    clean_env.setenv("RECIPROCAM_BATCH", '{"max_batch_images": ')
    with pytest.raises(SettingsProblem, match=r"RECIPROCAM_BATCH is not valid JSON.*write a JSON object"):
        load_settings()


def test_value_errors_name_the_variable_and_what_to_write(clean_env, tmp_path):
    from app.config import SettingsProblem, load_settings

    clean_env.setenv("RECIPROCAM_BATCH__MAX_BATCH_IMAGES", "0")
    clean_env.setenv("RECIPROCAM_IO_WORKERS", "two")
    with pytest.raises(SettingsProblem) as info:
        load_settings()
    message = str(info.value)
    assert "RECIPROCAM_BATCH__MAX_BATCH_IMAGES" in message and "greater than or equal to 1" in message
    assert "RECIPROCAM_IO_WORKERS" in message and "write a whole number" in message
    clean_env.delenv("RECIPROCAM_BATCH__MAX_BATCH_IMAGES")
    clean_env.delenv("RECIPROCAM_IO_WORKERS")
    config = tmp_path / "service.json"
    config.write_text(json.dumps({"batch": {"max_wiat_ms": 2}}), encoding="utf-8")
    clean_env.setenv("RECIPROCAM_CONFIG_FILE", str(config))
    with pytest.raises(SettingsProblem, match=r"batch.max_wiat_ms in .*did you mean 'max_wait_ms'"):
        load_settings()


def test_serve_stops_on_a_setting_mistake_with_status_2(clean_env, capsys):
    from app.cli import main

    clean_env.setenv("RECIPROCAM_DRAIN_TIMOUT_S", "3")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "RECIPROCAM_DRAIN_TIMEOUT_S" in err and "Traceback" not in err


def test_config_file_mistakes_say_what_to_give(clean_env, tmp_path):
    from app.config import SettingsProblem, load_settings

    clean_env.setenv("RECIPROCAM_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsProblem, match="does not exist: give the path of a JSON or YAML"):
        load_settings()
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    clean_env.setenv("RECIPROCAM_CONFIG_FILE", str(listed))
    with pytest.raises(SettingsProblem, match="mapping at the top level, with keys such as models"):
        load_settings()
