"""The start-up summary: ``Service.summary()``, logged at INFO when the app starts and printed by
``mirage serve``."""

from __future__ import annotations

import logging

from conftest import grad2_defense, make_config
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mirage.cli import app as cli
from mirage.serve.app import create_app
from mirage.serve.config import ServeConfig
from mirage.serve.service import Service, _without_credentials


def test_the_summary_names_model_defense_parts_ownership_detection_storage_and_grpc(
    tmp_path, checkpoints
):
    (tmp_path / "secret").write_bytes(b"a-test-secret-of-32-bytes-000000")
    raw = make_config(tmp_path, checkpoints, defense=grad2_defense(checkpoints)).model_dump(
        mode="json"
    )
    config = ServeConfig.model_validate(
        {
            **raw,
            "grpc": {"port": 8101},
            "ownership": {
                "secret_env": None,
                "secret_file": str(tmp_path / "secret"),
                "evidence": str(tmp_path / "evidence.sqlite"),
            },
            "detection": {"on_alarm": "switch", "alarm_defense": {"name": "argmax"}},
        }
    )
    service = Service(config)
    try:
        summary = service.summary()
    finally:
        service.close()
    lines = summary.splitlines()
    assert 5 <= len(lines) <= 10, summary
    for text in (
        f"model 'digits': checkpoint {checkpoints['victim']}",
        "input 1×8×8, 10 classes (0, 1, 2, 3, …, 9)",
        "device cpu",
        "defense: grad2 (epsilon=0.5, target=all-ones",
        "one instance per client",
        f"parts: surrogate {checkpoints['surrogate']}",
        "ownership: on",
        f"evidence {tmp_path / 'evidence.sqlite'}",
        "detection: on, PRADA",
        "on alarm: switch to argmax",
        f"storage: sqlite {tmp_path / 'serve.sqlite'}; audit log {tmp_path / 'serve.sqlite'}",
        "grpc: on, 127.0.0.1:8101",
        "clients: 3",
        "max_batch 64",
    ):
        assert text in summary, (text, summary)
    assert "seed" not in summary and not any(c.key_sha256 in summary for c in config.clients)

    plain = Service(make_config(tmp_path / "plain", checkpoints))
    try:
        summary = plain.summary()
    finally:
        plain.close()
    for text in ("defense: none", "ownership: off", "detection: off", "grpc: off"):
        assert text in summary, (text, summary)


def test_a_redis_password_never_reaches_the_summary():
    assert _without_credentials("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert _without_credentials("redis://user:hunter2@db/0") == "redis://user:***@db/0"
    assert _without_credentials("redis://db:6379/0") == "redis://db:6379/0"


def test_the_app_logs_the_summary_at_info_when_it_starts(tmp_path, checkpoints, caplog):
    application = create_app(make_config(tmp_path, checkpoints))
    with caplog.at_level(logging.INFO, logger="mirage.serve.app"), TestClient(application):
        pass
    [record] = [r for r in caplog.records if "started" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert application.state.service.summary() in record.getMessage()


def test_mirage_serve_prints_the_summary(tmp_path, checkpoints, monkeypatch):
    config = make_config(tmp_path, checkpoints)
    path = tmp_path / "serve.json"
    path.write_text(config.model_dump_json())
    started = []

    def serve_forever(
        application, host, port
    ):  # start and stop the app instead of serving for ever
        with TestClient(application):
            started.append(application.state.service.summary())

    monkeypatch.setattr("mirage.serve.runner.serve_forever", serve_forever)
    result = CliRunner().invoke(cli, ["serve", "--config", str(path), "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert started and all(line in result.output for line in started[0].splitlines()), result.output
