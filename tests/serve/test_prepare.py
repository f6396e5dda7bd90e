"""The service loads models and never trains them (docs/design.md §service): a scenario's victim
or surrogate that is not in the model store stops the service at once with an error naming
`mirage prepare`, which trains and keeps them; the service then starts from the store."""

from __future__ import annotations

import time

import pytest
from conftest import KEYS
from typer.testing import CliRunner

from mirage.cli.app import app
from mirage.models import ModelNotPrepared
from mirage.serve.auth import hash_key
from mirage.serve.config import load_config
from mirage.serve.service import Service

CONFIG = """
[model]
name = "digits"
scenario = "digits"

[defense]
name = "grad2"
params = {{ epsilon = 0.5, target = "all-ones" }}
surrogate = "distilled"
surrogate_config = {{ num_queries = 300, stop_epoch = 1 }}

[storage]
database = "{database}"

[[clients]]
name = "alice"
key_sha256 = "{digest}"
"""


@pytest.mark.slow
def test_the_service_never_trains_and_mirage_prepare_does(tmp_path, isolated_cache):
    path = tmp_path / "serve.toml"
    path.write_text(CONFIG.format(database=tmp_path / "q.sqlite", digest=hash_key(KEYS["alice"])))
    config = load_config(path)

    start = time.perf_counter()
    with pytest.raises(ModelNotPrepared, match="mirage prepare"):
        Service(config)
    assert time.perf_counter() - start < 10 and not (isolated_cache / "victims").exists()
    refused = CliRunner().invoke(app, ["serve", "--config", str(path)])
    assert refused.exit_code == 2 and "mirage prepare" in refused.output
    assert "Traceback" not in refused.output

    prepared = CliRunner().invoke(app, ["prepare", "--config", str(path)])
    assert prepared.exit_code == 0, prepared.output
    assert "prepared model digits" in prepared.output
    assert list((isolated_cache / "victims").glob("digits-*"))
    assert list((isolated_cache / "surrogates").glob("digits-distilled-*"))
    service = Service(config)  # from the store, nothing trained
    try:
        assert service.defenses.prototype is not None
    finally:
        service.close()
