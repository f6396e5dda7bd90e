"""Every attacker of the suite runs unchanged against the real service (uvicorn on 127.0.0.1)
through ``HTTPPredictionAPI``, spending exactly its budget — the server's quota counts every
averaged query and every decoy; the multi-key attacker holds one ``HTTPPredictionAPI`` per key."""

from contextlib import ExitStack

import pytest
import torch
from conftest import KEYS, make_config, stored_counts

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
    keys = ATTACKER_SUITE[variant].get("api_keys", 1)
    names = ["alice", "bob", "carol", "dave"][:keys]
    config = make_config(
        tmp_path,
        checkpoints,
        defense={"name": "random_noise", "params": {"epsilon": 0.5}},
        clients=[{"name": name, "quota": 90} for name in names],
    )
    pool = ImageData(
        torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.zeros(200).long(),
    )
    params = tell_restorer(dict(ATTACKER_SUITE[variant]), "random_noise", {"epsilon": 0.5})
    if variant == "restorer":
        params["restorer"] = {**params["restorer"], **SMALL_RESTORER}
    if variant == "confident-only":
        params["min_confidence"] = 0.1  # the tiny random-weight victim is never 90 % sure
    if keys > 1:
        params["query_batch_size"] = 15  # requests go round-robin over the keys
    clone = CloneSpec(mean=(0.3,), std=(0.3,), training=TrainConfig(epochs=1, batch_size=32))
    with ServerThread(create_app(config)) as url, ExitStack() as stack:
        apis = [
            stack.enter_context(
                HTTPPredictionAPI(url, "digits", KEYS.get(name, f"key-{name}"), batch_size=16)
            )
            for name in names
        ]
        labelled = ImageData(
            torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
            torch.arange(100) % 10,
        )  # the aligned attacker's own labelled images
        result = create_attack("knockoff", **params).run(
            apis if keys > 1 else apis[0], 90, pool, clone, seed=0, labelled=labelled
        )
        assert result.queries == 90 == sum(api.queries_used for api in apis)
        assert result.queries_per_key == [api.queries_used for api in apis]
        if keys == 1:
            assert (
                apis[0].queries_left == 0
            )  # the server charged every query the attack sent, no more
    assert result.transfer_size == (30 if variant == "averaging" else 90)
    assert result.decoys == (27 if variant == "mixing" else 0)
    assert result.effective_l1 is None  # a remote API cannot know the clean answers
    assert ("alignment" in result.history[-1]) == (variant == "aligned")


def test_a_multi_key_attacker_over_http_spends_its_budget_split_across_its_two_keys(
    tmp_path, checkpoints
):
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[
            {"name": "alice", "quota": 45},
            {"name": "bob", "quota": 45},
            {"name": "carol", "quota": 45},
        ],
    )
    pool = ImageData(
        torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.zeros(200).long(),
    )
    clone = CloneSpec(mean=(0.3,), std=(0.3,), training=TrainConfig(epochs=1, batch_size=32))
    attack = create_attack("knockoff", api_keys=2, query_batch_size=15)
    with (
        ServerThread(create_app(config)) as url,
        HTTPPredictionAPI(url, "digits", KEYS["alice"]) as alice,
        HTTPPredictionAPI(url, "digits", KEYS["bob"]) as bob,
    ):
        with pytest.raises(TypeError, match="one API per key"):  # a remote key cannot be made up
            attack.run(alice, 90, pool, clone, seed=0)
        result = attack.run([alice, bob], 90, pool, clone, seed=0)
        assert alice.queries_left == bob.queries_left == 0
    usage, _ = stored_counts(config)
    assert result.queries == 90 and result.queries_per_key == [45, 45]
    assert usage == {
        "alice": (45, 3),
        "bob": (45, 3),
    }  # 6 requests of 15, alternating; carol untouched
