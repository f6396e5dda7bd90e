"""Every attacker of the suite runs unchanged against the real service (uvicorn on 127.0.0.1)
through ``HTTPPredictionAPI``, spending exactly its budget — the server's quota counts every
averaged query."""

import pytest
import torch
from conftest import KEYS, make_config

from mirage.attacks import ATTACKER_SUITE, CloneSpec, create_attack
from mirage.attacks.restorer import tell_restorer
from mirage.data import ImageData
from mirage.models.fit import TrainConfig
from mirage.serve.app import create_app
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.runner import ServerThread

SMALL_RESTORER = {"pairs": 40, "epochs": 3, "shadow_epochs": 1}


@pytest.mark.parametrize("variant", sorted(ATTACKER_SUITE))
def test_suite_attacker_over_http_spends_exactly_its_budget(tmp_path, checkpoints, variant):
    config = make_config(tmp_path, checkpoints, defense={"name": "random_noise", "params": {"epsilon": 0.5}},
                         clients=[{"name": "alice", "quota": 90}])
    pool = ImageData(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(200).long())
    params = tell_restorer(dict(ATTACKER_SUITE[variant]), "random_noise", {"epsilon": 0.5})
    if variant == "restorer":
        params["restorer"] = {**params["restorer"], **SMALL_RESTORER}
    if variant == "confident-only":
        params["min_confidence"] = 0.1  # the tiny random-weight victim is never 90 % sure
    clone = CloneSpec(mean=(0.3,), std=(0.3,), training=TrainConfig(epochs=1, batch_size=32))
    with (ServerThread(create_app(config)) as url,
          HTTPPredictionAPI(url, "digits", KEYS["alice"], batch_size=16) as api):
        result = create_attack("knockoff", **params).run(api, 90, pool, clone, seed=0)
        assert result.queries == 90 and api.queries_used == 90
        assert api.queries_left == 0  # the server charged every query the attack sent, no more
    assert result.transfer_size == (30 if variant == "averaging" else 90)
    assert result.effective_l1 is None  # a remote API cannot know the clean answers
