"""Config is parsed once; every bad option fails at construction with an error naming the key."""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Dict

import pytest

from moesiftornado_durable import ConfigError, MoesifMiddleware
from moesiftornado_durable.config import DEFAULT_BASE_URI, Config, default_spool_dir


def options(tmp_path: Any, **extra: Any) -> Dict[str, Any]:
    base: Dict[str, Any] = {"APPLICATION_ID": "app-id-1234", "SPOOL_DIR": str(tmp_path / "spool")}
    base.update(extra)
    return base


def test_defaults_match_the_original_and_the_issue(tmp_path: Any) -> None:
    config = Config.from_dict(options(tmp_path))
    assert config.log_body is True
    assert config.batch_size == 25
    assert config.base_uri == DEFAULT_BASE_URI
    assert config.flush_interval == 1.0
    assert config.send_timeout == 10.0
    assert config.spool_sync == "normal"
    assert config.debug is False


@pytest.mark.parametrize(
    "key, value",
    [
        ("APPLICATION_ID", None),
        ("APPLICATION_ID", ""),
        ("APPLICATION_ID", 42),
        ("SKIP", "not a function"),
        ("IDENTIFY_USER", 1),
        ("IDENTIFY_COMPANY", object()),
        ("GET_METADATA", {"a": 1}),
        ("GET_SESSION_TOKEN", "token"),
        ("MASK_EVENT_MODEL", True),
        ("API_VERSION", 3),
        ("BATCH_SIZE", 0),
        ("BATCH_SIZE", -5),
        ("BATCH_SIZE", "25"),
        ("BATCH_SIZE", 2.5),
        ("LOG_BODY", "yes"),
        ("DEBUG", 1),
        ("FLUSH_INTERVAL", 0),
        ("SEND_TIMEOUT", -1),
        ("SEND_TIMEOUT", "10"),
        ("BASE_URI", "ftp://example.com"),
        ("BASE_URI", "not a url"),
        ("SPOOL_SYNC", "sometimes"),
        ("MAX_BODY_BYTES", -1),
    ],
)
def test_a_bad_option_fails_at_construction_naming_the_key(tmp_path: Any, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        MoesifMiddleware(options(tmp_path, **{key: value}))
    assert raised.value.key == key
    assert key in str(raised.value)
    assert isinstance(raised.value, ValueError)  # callers catching ValueError keep working


def test_missing_application_id(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="APPLICATION_ID"):
        MoesifMiddleware({"SPOOL_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="APPLICATION_ID"):
        MoesifMiddleware(None)  # type: ignore[arg-type]


def test_spool_dir_that_cannot_be_created(tmp_path: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="SPOOL_DIR") as raised:
        MoesifMiddleware(options(tmp_path, SPOOL_DIR=str(blocker / "spool")))
    assert raised.value.key == "SPOOL_DIR"


def test_spool_dir_that_cannot_be_written(tmp_path: Any) -> None:
    # Root ignores permission bits, so use a path that is read-only for everyone: /proc.
    with pytest.raises(ConfigError, match="SPOOL_DIR"):
        MoesifMiddleware(options(tmp_path, SPOOL_DIR="/proc/moesif-spool"))


def test_spool_dir_is_created_private(tmp_path: Any) -> None:
    spool = tmp_path / "deep" / "spool"
    Config.from_dict(options(tmp_path, SPOOL_DIR=str(spool)))
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700


def test_unknown_key_warns_with_its_name(tmp_path: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
        Config.from_dict(options(tmp_path, IDENTIFY_USR=lambda h: "x"))
    assert any("IDENTIFY_USR" in record.getMessage() for record in caplog.records)


def test_base_uri_is_honoured_without_debug(tmp_path: Any) -> None:
    config = Config.from_dict(options(tmp_path, BASE_URI="http://127.0.0.1:9/"))
    assert config.base_uri == "http://127.0.0.1:9"
    assert config.debug is False


def test_repr_masks_the_application_id(tmp_path: Any) -> None:
    config = Config.from_dict(options(tmp_path, APPLICATION_ID="secret-application-id"))
    assert "secret-application-id" not in repr(config)


def test_default_spool_dir_is_persistent_and_per_application(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    first, second = default_spool_dir("app-one"), default_spool_dir("app-two")
    assert first.startswith(str(tmp_path / "state" / "moesiftornado-durable"))
    assert first != second
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_spool_dir("app-one").startswith(os.path.expanduser("~/.local/state/"))
    assert not default_spool_dir("app-one").startswith("/tmp")
