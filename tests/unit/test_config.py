from __future__ import annotations

from pathlib import Path

import pytest

from nubes.config import NubesConfig, StoreEngine, load_config
from nubes.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_apply_without_a_file(tmp_path: Path) -> None:
    config = load_config(environ={})  # /etc/nubes/nubes.toml does not exist here
    assert config.store.engine is StoreEngine.SQLITE
    assert config.sqlite_path == Path("/var/lib/nubes/nubes.db")
    assert config.store.endpoints == ["127.0.0.1:2379"]


def test_the_file_named_by_nubes_config_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "nubes.toml",
        'state_dir = "/srv/nubes"\n[store]\nengine = "etcd"\nendpoints = ["10.0.0.1:2379"]\n',
    )
    config = load_config(environ={"NUBES_CONFIG": str(path)})
    assert config.store.engine is StoreEngine.ETCD
    assert config.store.endpoints == ["10.0.0.1:2379"]
    assert config.sqlite_path == Path("/srv/nubes/nubes.db")


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "nubes.toml", '[store]\nengine = "sqlite"\ntimeout = 3\n')
    config = load_config(
        path,
        environ={
            "NUBES_STORE__ENGINE": "etcd",
            "NUBES_STORE__ENDPOINTS": "198.18.0.1:2379, 198.18.0.2:2379",
            "NUBES_STATE_DIR": "/tmp/state",
            "NUBES_SOMETHING_ELSE": "ignored: not a setting section",
        },
    )
    assert config.store.engine is StoreEngine.ETCD
    assert config.store.endpoints == ["198.18.0.1:2379", "198.18.0.2:2379"]
    assert config.store.timeout == 3
    assert config.state_dir == Path("/tmp/state")


def test_a_bad_value_names_the_setting_its_source_and_what_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "nubes.toml", '[store]\nengine = "mysql"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    message = str(raised.value)
    assert "store.engine" in message
    assert "'sqlite' or 'etcd'" in message
    assert "'mysql'" in message
    assert str(path) in message
    assert raised.value.code == "config_invalid"


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"NUBES_STORE__TIMEOUT": "soon"})
    assert "store.timeout" in str(raised.value)
    assert "NUBES_STORE__TIMEOUT" in str(raised.value)


def test_an_unknown_setting_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "nubes.toml", '[store]\nengin = "etcd"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    message = str(raised.value)
    assert "store.engin: unknown setting" in message
    assert "engine" in message
    assert "endpoints" in message


def test_a_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(environ={"NUBES_CONFIG": str(tmp_path / "absent.toml")})
    assert "does not exist" in str(raised.value)


def test_invalid_toml_is_reported_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path / "nubes.toml", "[store\nengine=\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert "not valid TOML" in str(raised.value)
    assert "line 1" in str(raised.value)


def test_out_of_range_numbers_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "nubes.toml", "[store]\ntimeout = -1\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert "store.timeout" in str(raised.value)
    assert "greater than 0" in str(raised.value)


def test_the_model_is_frozen() -> None:
    config = NubesConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.state_dir = Path("/")  # type: ignore[misc]
