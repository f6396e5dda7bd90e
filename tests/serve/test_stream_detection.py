"""PRADA in the service (docs/design.md §detection): a real server on 127.0.0.1, a JBDA-like
stream from one key and natural digits from another.

The streams are chosen so that PRADA's outcome is not a matter of luck. The thief starts from two
seed images the victim puts in one class, then takes ±0.02 sign steps (an L2 step of at most
0.16 in 64 pixels, against about 2-4 between two digits). So its distances are one large value
(the second seed's) among many near-equal tiny ones, and the Shapiro–Wilk W of its first 20 is
far below δ. The benign client sends digits in a fixed order, whose W stays far above δ.
δ = 0.7 is lower than the default 0.9 because the test's window is 60 distances, not 500, and W
moves more on small samples. Each test first checks both margins in process with the same
detector, then checks that the server reproduces the in-process alarm query for query.
"""

from __future__ import annotations

import logging
import re
import threading

import httpx
import pytest
import torch
from conftest import KEYS, METRICS_KEY, auth, body, make_config, stored_counts
from pydantic import ValidationError

from mirage.api import InProcessAPI, QueryRefused
from mirage.api.detection import PradaConfig, PradaDetector
from mirage.api.inprocess import clean_posteriors
from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.audit import AuditLog
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import ServeConfig, load_config
from mirage.serve.runner import ServerThread

URL_INFER = "/v2/models/digits/infer"
PRADA = {"delta": 0.7, "min_distances": 20, "window": 60}
STEPS = 30  # the thief's requests after its seeds: two images each, one step of each walker


@pytest.fixture(scope="module")
def victim(checkpoints):
    model, _ = load_checkpoint(checkpoints["victim"])
    return model.eval()


@pytest.fixture(scope="module")
def streams(victim) -> dict[str, list[torch.Tensor]]:
    """Each client's requests: the thief's (two seeds of one predicted class, then sign steps of
    both) and the benign client's (300 digits, ten per request)."""
    digits = load_dataset("digits")
    pool = digits.test.images
    labels = clean_posteriors(victim, pool).argmax(1)
    common = int(labels.mode().values)
    current = pool[labels == common][:2]
    generator = torch.Generator().manual_seed(0)
    thief = [current]
    for _ in range(STEPS):
        current = (
            current + 0.02 * torch.sign(torch.randn(current.shape, generator=generator))
        ).clamp(0, 1)
        thief.append(current)
    order = torch.randperm(len(digits.train.images), generator=torch.Generator().manual_seed(1))
    benign = list(digits.train.images[order[:300]].split(10))
    return {"thief": thief, "benign": benign}


def in_process(victim, requests: list[torch.Tensor]) -> tuple[int | None, list[float]]:
    """PRADA in process on the victim's predictions: (the alarm's query count, W after each
    test)."""
    detector = PradaDetector(PradaConfig(**PRADA))
    statistics = []
    for x in requests:
        state = detector.observe("reference", x, clean_posteriors(victim, x).argmax(1))
        if state.statistic is not None and state.since_check == 0:
            statistics.append(state.statistic)
    return state.alarm_at, statistics


@pytest.fixture(scope="module")
def expected(victim, streams) -> int:
    """The thief's alarm in process, after checking that both outcomes are clear-cut."""
    alarm_at, thief_w = in_process(victim, streams["thief"])
    assert alarm_at is not None and thief_w[0] < PRADA["delta"] - 0.3, thief_w[
        :3
    ]  # the first test alarms
    assert alarm_at <= PRADA["min_distances"] + 4
    benign_alarm, benign_w = in_process(victim, streams["benign"])
    assert benign_alarm is None and min(benign_w) > PRADA["delta"] + 0.1, min(benign_w)
    return alarm_at


def detection_config(
    tmp_path, checkpoints, *, defense=None, access=None, **detection
) -> ServeConfig:
    config = make_config(
        tmp_path, checkpoints, defense=defense, access=access, limits={"microbatch_wait_ms": 20}
    )
    return ServeConfig.model_validate(
        {**config.model_dump(mode="json"), "detection": {"prada": PRADA, **detection}}
    )


def answers(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    return torch.tensor(out["data"]).view(out["shape"])


def send(http: httpx.Client, client: str, requests: list[torch.Tensor]) -> list[httpx.Response]:
    return [http.post(URL_INFER, json=body(x), headers=auth(client)) for x in requests]


def alarm_events(config) -> list[dict]:
    audit = AuditLog(config.audit_path)
    try:
        return [event for event in audit.events() if event["kind"] == "prada_alarm"]
    finally:
        audit.close()


def queries_of(event: dict) -> int:
    return int(re.search(r"queries=(\d+)", event["detail"]).group(1))


@pytest.mark.slow
def test_flag_records_the_thief_once_and_nobody_else(
    tmp_path, checkpoints, victim, streams, expected, caplog
):
    config = detection_config(tmp_path, checkpoints)  # on_alarm = "flag", the defense not disclosed
    with (
        caplog.at_level(logging.WARNING, logger="mirage.serve.service"),
        ServerThread(create_app(config)) as url,
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        benign = send(http, "bob", streams["benign"])
        thief = send(http, "alice", streams["thief"])
        again = send(
            http, "alice", streams["thief"][:3]
        )  # after the alarm: answered, no second event
        per_client = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
        aggregate = http.get("/metrics").text
        meta = http.get("/v2/models/digits", headers=auth("alice")).json()
    for requests, responses in (
        (streams["thief"], thief),
        (streams["benign"], benign),
        (streams["thief"][:3], again),
    ):
        for x, response in zip(requests, responses, strict=True):  # flag only: the clean answers
            torch.testing.assert_close(
                answers(response), clean_posteriors(victim, x), rtol=0, atol=1e-6
            )
    events = alarm_events(config)
    assert [(e["source"], queries_of(e)) for e in events] == [("alice", expected)]
    assert "on_alarm=flag" in events[0]["detail"]
    assert 'mirage_prada_alarms_total{client="alice",model="digits"} 1.0' in per_client
    assert 'client="bob"' not in "".join(
        line for line in per_client.splitlines() if "prada" in line
    )
    assert (
        "prada" not in aggregate and 'mirage_requests_total{model="digits"}' in aggregate
    )  # the thief is not told
    warnings = [r.getMessage() for r in caplog.records if "PRADA alarm" in r.getMessage()]
    assert len(warnings) == 1 and "client alice" in warnings[0]
    assert "flagged" not in meta["parameters"]["client"]  # not disclosed: the thief is not told


@pytest.mark.slow
def test_refuse_is_a_403_that_charges_nothing(tmp_path, checkpoints, streams, expected):
    config = detection_config(
        tmp_path, checkpoints, on_alarm="refuse", access={"disclose_defense": True}
    )
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        responses = send(http, "alice", streams["thief"])
        statuses = [r.status_code for r in responses]
        answered = statuses.index(403)
        before = stored_counts(config)
        refused = http.post(URL_INFER, json=body(streams["thief"][0]), headers=auth("alice"))
        garbage = http.post(URL_INFER, content=b"{not json", headers=auth("alice"))
        after = stored_counts(config)
        bob = send(http, "bob", streams["benign"][:2])
        flagged = {
            name: http.get("/v2/models/digits", headers=auth(name)).json()["parameters"]["client"]
            for name in ("alice", "bob")
        }
        with HTTPPredictionAPI(url, "digits", KEYS["alice"]) as api, pytest.raises(QueryRefused):
            api.query(streams["thief"][0])
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
        final = stored_counts(config)
    assert statuses[:answered] == [200] * answered and set(statuses[answered:]) == {403}
    assert (
        sum(len(x) for x in streams["thief"][:answered]) == expected
    )  # refused from the next request on
    for response in (refused, garbage, *responses[answered:]):
        assert (response.status_code, response.json()["reason"]) == (403, "query_stream_refused")
    assert before == after  # nothing reserved, charged or audited
    assert before[0]["alice"] == (expected, answered) and before[1] == (answered, expected)
    assert [r.status_code for r in bob] == [200, 200]
    assert final[0]["alice"] == before[0]["alice"]
    assert (flagged["alice"]["flagged"], flagged["bob"]["flagged"]) == (True, False)
    assert flagged["alice"]["on_alarm"] == "refuse"
    assert [queries_of(e) for e in alarm_events(config)] == [expected]
    refusals = len(responses) - answered + 3  # the stream's rest, the two probes and the client's
    assert (
        f'mirage_rejected_requests_total{{reason="query_stream_refused"}} {float(refusals)}'
        in metrics
    )


@pytest.mark.slow
def test_switch_answers_the_alarmed_client_with_the_alarm_defense(
    tmp_path, checkpoints, victim, streams, expected
):
    alarm_defense = {
        "name": "grad2",
        "params": {"epsilon": 0.5, "target": "all-ones"},
        "surrogate": str(checkpoints["surrogate"]),
    }
    config = detection_config(tmp_path, checkpoints, on_alarm="switch", alarm_defense=alarm_defense)
    surrogate, _ = load_checkpoint(checkpoints["surrogate"])
    strong = create_defense("grad2", epsilon=0.5, target="all-ones", surrogate=surrogate)
    probe = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    clean, defended = InProcessAPI(victim).query(probe), InProcessAPI(victim, strong).query(probe)
    assert (clean - defended).abs().sum(1).max() > 0.1  # the alarm defense changes these answers
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        thief = send(http, "alice", streams["thief"])
        together: dict[str, httpx.Response] = {}

        def ask(name: str) -> None:  # alice and bob at once, into one micro-batch (20 ms wait)
            with httpx.Client(base_url=url, timeout=30) as own:
                together[name] = own.post(URL_INFER, json=body(probe), headers=auth(name))

        threads = [threading.Thread(target=ask, args=(name,)) for name in ("alice", "bob")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seen = 0
    for x, response in zip(streams["thief"], thief, strict=True):
        answer = answers(response)
        reference = InProcessAPI(victim, strong if seen >= expected else None).query(x)
        torch.testing.assert_close(answer, reference, rtol=0, atol=1e-6)
        seen += len(x)
    torch.testing.assert_close(answers(together["alice"]), defended, rtol=0, atol=1e-6)
    torch.testing.assert_close(answers(together["bob"]), clean, rtol=0, atol=1e-6)
    assert [queries_of(e) for e in alarm_events(config)] == [expected]


def test_switch_keeps_the_ownership_watermark(tmp_path, checkpoints):
    from mirage.ownership import derive_key
    from mirage.serve.service import Service

    secret = b"a-test-secret-of-32-bytes-000000"
    (tmp_path / "secret").write_bytes(secret)
    config = detection_config(
        tmp_path, checkpoints, on_alarm="switch", alarm_defense={"name": "argmax"}
    )
    config = ServeConfig.model_validate(
        {
            **config.model_dump(mode="json"),
            "ownership": {
                "secret_env": None,
                "secret_file": str(tmp_path / "secret"),
                "evidence": str(tmp_path / "ev.sqlite"),
            },
        }
    )
    service = Service(config)
    try:
        defenses = service.defenses
        normal, alarmed = defenses.key("alice"), defenses.key("alice", alarmed=True)
        assert normal.client == "alice" and not normal.alarm
        assert alarmed not in {normal, defenses.key("bob", alarmed=True)}
        plain, switched = defenses(normal), defenses(alarmed)
        assert switched is defenses(alarmed) and switched is not plain
        for wrapper in (plain, switched):
            assert type(wrapper).__name__ == "Watermarked" and wrapper.params.client == "alice"
            assert wrapper.params.key == derive_key(secret, "alice")
        assert plain.params.inner is None and type(switched.params.inner).__name__ == "Argmax"
    finally:
        service.close()


def test_detection_config_is_validated(tmp_path, checkpoints):
    def config(**detection) -> ServeConfig:
        raw = make_config(tmp_path, checkpoints).model_dump(mode="json")
        return ServeConfig.model_validate({**raw, "detection": detection})

    assert config().detection.on_alarm == "flag"
    assert config(prada={"delta": 0.8}).detection.prada == PradaConfig(delta=0.8)
    cases = [
        ({"on_alarm": "switch"}, "needs detection.alarm_defense"),
        (
            {"on_alarm": "refuse", "alarm_defense": {"name": "argmax"}},
            "alarm_defense is the defense of",
        ),
        ({"alarm_defense": {"name": "argmax"}}, "alarm_defense is the defense of"),
        ({"on_alarm": "ban"}, "on_alarm"),
        ({"on_alarm": "switch", "alarm_defense": {"name": "ini"}}, "training-time"),
        ({"on_alarm": "switch", "alarm_defense": {"name": "nope"}}, "nope"),
        (
            {"on_alarm": "switch", "alarm_defense": {"name": "grad2"}},
            "detection.alarm_defense surrogate needs",
        ),
        ({"prada": {"delta": 1.5}}, "delta"),
        ({"prada": {"windows": 10}}, "windows"),
        ({"threshold": 3}, "threshold"),
    ]
    for detection, message in cases:
        with pytest.raises(ValidationError, match=message):
            config(**detection)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "serve.toml").write_text(
        f'[model]\nname = "digits"\ncheckpoint = "{checkpoints["victim"]}"\n'
        '[detection]\nprada = { delta = 0.8, window = 100 }\non_alarm = "switch"\n'
        '[detection.alarm_defense]\nname = "grad2"\nsurrogate = "surrogate"\n'
        f'[[clients]]\nname = "alice"\nkey_sha256 = "{"a" * 64}"\n'
    )
    loaded = load_config(tmp_path / "cfg" / "serve.toml")
    assert loaded.detection.prada == PradaConfig(delta=0.8, window=100)
    assert (
        loaded.detection.alarm_defense.surrogate == tmp_path / "cfg" / "surrogate"
    )  # anchored like [defense]


@pytest.mark.slow
def test_gated_grad2s_own_stream_alarm_is_recorded_once_and_scrambles_that_client_only(
    tmp_path, checkpoints, victim
):
    from mirage.defenses.grad2 import keyed_query_permutations

    # the gate is the victim's max softmax at τ = the median over these images: the thief sends
    # the 60 least confident, the benign client the 60 most confident (none of them flagged)
    pool = load_dataset("digits").test.images[:200]
    msp = clean_posteriors(victim, pool).max(1).values
    order = msp.argsort()
    tau = float(msp[order[100]])
    thief, benign = pool[order[:60]], pool[order[-60:]]
    defense = {
        "name": "grad2_gated",
        "surrogate": str(checkpoints["surrogate"]),
        "params": {
            "tau": tau,
            "gate_score": "msp",
            "epsilon_low": 0.3,
            "epsilon_high": 2.0,
            "target": "all-ones",
            "attacker_answer": "scramble",
            "alarm_rate": 0.1,
            "alarm_alpha": 1e-6,
        },
    }
    config = make_config(tmp_path, checkpoints, defense=defense)
    with pytest.raises(ValidationError, match="per_client"):
        make_config(tmp_path, checkpoints, defense={**defense, "per_client": False})
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url, timeout=30) as http:
        bob = [answers(r) for r in send(http, "bob", list(benign.split(20)))]
        alice = [answers(r) for r in send(http, "alice", list(thief.split(20)))]
        per_client = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    audit = AuditLog(config.audit_path)
    try:
        events = [
            (e["source"], e["detail"]) for e in audit.events() if e["kind"] == "defense_alarm"
        ]
    finally:
        audit.close()
    # every query flagged: the alarm is the first n with P(Binomial(n, 0.1) ≥ n) = 0.1ⁿ < 1e-6
    expected = next(n for n in range(1, 61) if 0.1**n < 1e-6)
    assert events == [("alice", f"queries={expected} defense=grad2_gated")]
    assert 'mirage_defense_alarms_total{client="alice",model="digits"} 1.0' in per_client
    assert 'mirage_defense_alarms_total{client="bob"' not in per_client
    clean = clean_posteriors(victim, thief)
    sigma = keyed_query_permutations(thief, 10, seed=0)
    for i, served in enumerate(torch.cat(alice)):  # every answer scrambled by its own keyed σ
        torch.testing.assert_close(served[sigma[i]], clean[i], rtol=0, atol=1e-5)
    assert (
        torch.cat(bob).argmax(1) == clean_posteriors(victim, benign).argmax(1)
    ).all()  # top-1 kept
