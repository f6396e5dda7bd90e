import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
from fake_runner import fake_run

from mirage.bench.config import load_config
from mirage.bench.results import ResultStore
from mirage.bench.runs import RunSpec, expand
from mirage.bench.sweep import RunFilter, run_sweep, sweep_status


def test_expansion_counts_and_stable_ids(small_config):
    runs = expand(small_config)
    # knockoff: (1 + 3 grid points) × 2 seeds; knockoff-hard: none only × 2 seeds
    assert len(runs) == 8 + 2
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.run_id for r in expand(small_config)] == [r.run_id for r in runs]


def test_builtin_profiles_parse():
    for name in ("quick", "full", "worst_case"):
        config = load_config(name)
        assert expand(config), name
    with pytest.raises(FileNotFoundError, match="built-in profiles"):
        load_config("nope")


def test_store_ignores_a_torn_last_line_and_appends_after_it(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append({"run_id": "a", "x": 1})
    with open(store.path, "a") as handle:
        handle.write('{"run_id": "b", "x"')  # killed mid-write
    assert [r["run_id"] for r in store.read()] == ["a"]
    store.append({"run_id": "c"})
    assert [r["run_id"] for r in store.read()] == ["a", "c"]


def test_a_run_is_recorded_once_even_by_two_sweeps_on_one_file(tmp_path):
    path = tmp_path / "r.jsonl"
    first, second = ResultStore(path), ResultStore(path)
    assert first.append({"run_id": "a", "clone_accuracy": 0.5})
    assert not second.append(
        {"run_id": "a", "clone_accuracy": 0.6}
    )  # a second sweep finished it too
    assert second.append({"run_id": "b", "clone_accuracy": 0.7})
    assert [(r["run_id"], r["clone_accuracy"]) for r in first.read()] == [("a", 0.5), ("b", 0.7)]
    with path.open("a") as handle:  # a file written before the lock: the reader keeps the first
        handle.write('{"run_id": "b", "clone_accuracy": 0.9}\n')
    assert [(r["run_id"], r["clone_accuracy"]) for r in first.read()] == [("a", 0.5), ("b", 0.7)]


def test_inline_sweep_then_rerun_does_nothing(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    status = run_sweep(
        small_config, results, runner=fake_run, executor="inline", show_progress=False
    )
    assert status.done == status.total == 10 and not status.pending
    assert all(datetime.fromisoformat(r["finished"]).tzinfo for r in ResultStore(results).read())
    before = results.read_text()
    run_sweep(small_config, results, runner=fake_run, executor="inline", show_progress=False)
    assert results.read_text() == before


def test_filter_runs_only_matching_runs_and_rejects_unknown_names(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    only = RunFilter(defenses=frozenset({"fake"}), attacks=frozenset({"knockoff"}))
    run_sweep(
        small_config, results, runner=fake_run, executor="inline", only=only, show_progress=False
    )
    records = ResultStore(results).read()
    assert len(records) == 6 and {r["defense_label"] for r in records} == {"fake"}
    assert sweep_status(small_config, ResultStore(results)).done == 6
    with pytest.raises(ValueError, match="no defense"):
        run_sweep(
            small_config,
            results,
            runner=fake_run,
            executor="inline",
            only=RunFilter(defenses=frozenset({"nonexistent"})),
            show_progress=False,
        )
    assert len(ResultStore(results).read()) == 6


def test_limit_and_status(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    run_sweep(
        small_config, results, runner=fake_run, executor="inline", limit=3, show_progress=False
    )
    status = sweep_status(small_config, ResultStore(results))
    assert status.done == 3 and len(status.pending) == 7 and status.eta_seconds is not None


@pytest.mark.slow
def test_process_pool_executor(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    status = run_sweep(
        small_config, results, runner=fake_run, executor="local", workers=2, show_progress=False
    )
    assert status.done == 10
    assert len(ResultStore(results).read()) == 10


@pytest.mark.slow
def test_pool_sweep_prepares_each_shared_model_once_in_this_process(tmp_path, small_config):
    prepared = []

    def prepare(spec, stores):
        prepared.append(spec)

    status = run_sweep(
        small_config,
        tmp_path / "r.jsonl",
        runner=fake_run,
        preparer=prepare,
        executor="local",
        workers=2,
        show_progress=False,
    )
    assert status.done == 10
    # one per defense point (none, fake × 3 epsilons), whatever the attacks and seeds
    assert sorted((run.defense, run.defense_params.get("epsilon")) for run in prepared) == [
        ("fake", 0.1),
        ("fake", 0.5),
        ("fake", 1.0),
        ("none", None),
    ]
    prepared.clear()
    run_sweep(
        small_config,
        tmp_path / "r.jsonl",
        runner=fake_run,
        preparer=prepare,
        executor="local",
        workers=2,
        show_progress=False,
    )
    assert prepared == []  # nothing pending, nothing to prepare


def test_pinned_models_live_next_to_the_results_and_the_environment_is_left_alone(
    tmp_path, small_config, monkeypatch
):
    monkeypatch.setenv("MIRAGE_MODELS", str(tmp_path / "elsewhere"))
    seen = []

    def runner(spec, stores):
        seen.append((stores.models, os.environ.get("MIRAGE_MODELS")))
        return fake_run(spec)

    pinned = small_config.model_copy(update={"models_dir": "../models"})
    run_sweep(
        pinned,
        tmp_path / "out" / "r.jsonl",
        runner=runner,
        executor="inline",
        limit=2,
        show_progress=False,
    )
    assert seen == [((tmp_path / "models").resolve(), str(tmp_path / "elsewhere"))] * 2
    run_sweep(
        small_config,
        tmp_path / "out" / "r.jsonl",
        runner=runner,
        executor="inline",
        limit=1,
        show_progress=False,
    )
    assert seen[-1][0] == tmp_path / "elsewhere"


def test_dask_local_cluster(tmp_path, small_config):
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        status = run_sweep(
            small_config,
            tmp_path / "r.jsonl",
            runner=fake_run,
            executor="dask",
            scheduler=client,
            show_progress=False,
        )
    assert status.done == 10


@pytest.mark.slow
def test_killed_sweep_resumes_without_losing_or_redoing_runs(tmp_path, small_config):
    config_path = tmp_path / "c.json"
    config_path.write_text(small_config.model_dump_json())
    results = tmp_path / "r.jsonl"
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from fake_runner import fake_run
        from mirage.bench.config import SweepConfig
        from mirage.bench.sweep import run_sweep
        config = SweepConfig.model_validate_json(open({str(config_path)!r}).read())
        run_sweep(config, {str(results)!r}, runner=fake_run, executor="inline", show_progress=False)
    """)
    env = {**os.environ, "FAKE_RUN_SECONDS": "0.3"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(ResultStore(results).read()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = ResultStore(results).read()
    assert 3 <= len(finished) < 10
    status = run_sweep(
        small_config, results, runner=fake_run, executor="inline", show_progress=False
    )
    records = ResultStore(results).read()
    ids = [r["run_id"] for r in records]
    assert status.done == 10 and len(ids) == len(set(ids)) == 10
    assert records[: len(finished)] == finished  # nothing finished was rewritten
    json.dumps(records)


def test_victim_epochs_must_name_a_scenario_of_the_sweep(small_config):
    from mirage.bench.config import SweepConfig

    data = small_config.model_dump()
    assert (
        expand(SweepConfig.model_validate({**data, "victim_epochs": {"digits": 2}}))[
            0
        ].victim_epochs
        == 2
    )
    with pytest.raises(ValueError, match="victim_epochs"):
        SweepConfig.model_validate({**data, "victim_epochs": {"fmnist": 2}})


def test_scenario_grid_replaces_the_grid_in_its_scenario_only(small_config):
    from mirage.bench.config import SweepConfig

    data = small_config.model_dump()
    data["scenarios"] = ["digits", "mnist"]
    data["defenses"][1]["scenario_grid"] = {"mnist": {"epsilon": [0.5]}}
    runs = expand(SweepConfig.model_validate(data))
    fake = {(r.scenario, r.defense_params["epsilon"]) for r in runs if r.defense == "fake"}
    assert fake == {("digits", 0.1), ("digits", 0.5), ("digits", 1.0), ("mnist", 0.5)}
    # the scenario with the default grid keeps the run ids it had without the override
    plain = {r.run_id for r in expand(small_config)}
    assert plain == {r.run_id for r in runs if r.scenario == "digits"}
    data["defenses"][1]["scenario_grid"] = {"cifar10": {"epsilon": [0.5]}}
    with pytest.raises(ValueError, match="scenario_grid names scenarios not in this sweep"):
        SweepConfig.model_validate(data)


def test_a_record_gives_back_its_spec_and_a_store_can_be_rewritten(tmp_path, small_config):
    spec = expand(small_config)[0]
    store = ResultStore(tmp_path / "r.jsonl")
    store.append({"run_id": spec.run_id, **spec.model_dump(mode="json"), "clone_accuracy": 0.5})
    record = store.read()[0]
    assert RunSpec.from_record(record) == spec
    store.rewrite([{**record, "clone_accuracy": 0.25}])
    assert store.read() == [{**record, "clone_accuracy": 0.25}]
    assert not list(tmp_path.glob("*.tmp"))


def _suite_config(small_config):
    from mirage.bench.config import SweepConfig

    raw = small_config.model_dump()
    raw["attacks"] = [{"name": "knockoff", "budget": 100, "variants": ["soft", "hard-label"]}]
    return SweepConfig.model_validate(raw)


def test_variants_expand_into_labelled_attacks_with_stable_ids(small_config):
    suite = _suite_config(small_config)
    runs = expand(suite)
    assert {r.attack_label for r in runs} == {"knockoff/soft", "knockoff/hard-label"}
    assert all(r.attack_family == "knockoff" for r in runs)
    hard = next(r for r in runs if r.attacker == "hard-label")
    assert hard.attack_params == {"hard_labels": True}
    # the soft attacker of the suite is the plain attack of the small config: the same run ids
    plain = {r.run_id for r in expand(small_config) if r.attack_label == "knockoff"}
    assert plain == {r.run_id for r in runs if r.attacker == "soft"}
    assert RunFilter(attacks=frozenset({"knockoff"}))(hard)  # a family matches its variants
    # … but not the attackers beyond the suite, which are asked for by their own label
    raw = suite.model_dump()
    raw["attacks"][0]["extra_variants"] = ["aligned"]
    extended = type(suite).model_validate(raw)
    aligned = next(r for r in expand(extended) if r.attacker == "aligned")
    assert RunFilter.of(extended, attacks=["knockoff"])(hard)
    assert not RunFilter.of(extended, attacks=["knockoff"])(aligned)
    assert RunFilter.of(extended, attacks=["knockoff/aligned"])(aligned)
    assert RunFilter.of(extended)(aligned)  # no attack asked for: every run
    # an extra runs only against the defenses it answers, when told which
    defenses = sorted({r.defense_label for r in expand(extended)})
    raw["attacks"][0]["extra_defenses"] = {"aligned": [defenses[0]]}
    narrowed = expand(type(suite).model_validate(raw))
    assert {r.defense_label for r in narrowed if r.attacker == "aligned"} == {defenses[0]}
    assert {r.defense_label for r in narrowed if r.attacker == "hard-label"} == set(defenses)
    for bad, match in (
        ({"aligned": ["nonesuch"]}, "defenses not in this sweep"),
        ({"hard-label": [defenses[0]]}, "not extra_variants"),
    ):
        raw["attacks"][0]["extra_defenses"] = bad
        with pytest.raises(ValueError, match=match):
            type(suite).model_validate(raw)
    with pytest.raises(ValueError, match="unknown attacker variants"):
        from mirage.bench.config import AttackSpec

        AttackSpec(name="knockoff", budget=10, variants=["telepathy"])


def test_import_copies_identical_runs_relabelled_and_only_once(tmp_path, small_config):
    from mirage.bench.sweep import import_records

    source = ResultStore(tmp_path / "old.jsonl")
    run_sweep(small_config, source.path, runner=fake_run, executor="inline", show_progress=False)
    suite = _suite_config(small_config)
    target = ResultStore(tmp_path / "new.jsonl")
    only_soft = RunFilter(attacks=frozenset({"knockoff/soft"}))
    assert import_records(suite, source, target, only_soft) == 8  # (none + 3 points) × 2 seeds
    assert import_records(suite, source, target) == 0  # hard-label runs differ (params), none twice
    records = target.read()
    assert {r["attack_label"] for r in records} == {"knockoff/soft"}
    assert all(
        r["attacker"] == "soft" and r["imported_from"].endswith("old.jsonl") for r in records
    )
    status = sweep_status(suite, target)
    assert status.done == 8 and len(status.pending) == 8
