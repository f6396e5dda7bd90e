"""Ownership: does the keyed hard-label watermark name the right API key after every attacker of the
suite and after the usual removal attacks, and never name an innocent model?

Per scenario and seed, with the victim of results/models/ served through `watermarked` (no
other defense underneath) to three clients, alice, bob and carol, each with its own key:

* the defender's cost: test accuracy through alice's key against clean, and the carried rate;
* Knockoff (15k queries, the worst_case profile's clone recipe) through alice's key by each
  attacker of the suite (soft, hard-label, averaging, restorer, noise-robust), and a hard-label
  clone through bob's key; every clone tested against every client's key and evidence;
* a thief holding several API keys (``--attackers multi-key multi-key-hard-label``: 4 keys,
  requests round-robin) gets one watermark key and one evidence set per API key, ``alice+i``, as
  the service derives them; each is tested;
* removal attacks on alice's hard-label clone: fine-tuning on 1k and 6k clean labelled images,
  magnitude pruning of 30 % and 60 % of its weights, distillation into a fresh model on the pool,
  and an extraction by jitter-and-vote (5 jittered copies per image, majority of hard labels);
* innocent models: the pinned victims of results/models/, clones of unwatermarked APIs from the
  clone cache (the benchmark's) and ``--innocent-distilled`` clones of the unwatermarked victim
  trained here, tested against every client's key: a false accusation is a named innocent.

Each entry is one JSON line of results/ownership/ownership.jsonl, written when it is done; a
re-run skips what is there (resumable).

    python experiments/ownership/ownership.py --scenario mnist --scenario fmnist-id --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, provenance

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from safetensors.torch import load_file, save_file

from mirage import paths
from mirage.api import InProcessAPI
from mirage.api.evaluate import accuracy, defended_accuracy
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.countermeasures import variant_params
from mirage.attacks.pools import attack_data
from mirage.attacks.restorer import tell_restorer
from mirage.bench.config import load_config
from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.models.base import clean_posteriors
from mirage.models.fit import TrainConfig, fit
from mirage.ownership import (
    Evidence,
    KeyedWatermark,
    WatermarkConfig,
    derive_key,
    fourier_features,
    layer_name,
    layered_watermarks,
    name_the_thief,
    watermark_layers,
)
from mirage.ownership.watermark import LAYER_SEPARATOR, capped_layers
from mirage.scenarios import attacker_labels, get_scenario, query_pool
from mirage.training.victim import get_victim

log = logging.getLogger("ownership")
CLIENTS = ("alice", "bob", "carol")
ATTACKERS = ("soft", "hard-label", "averaging", "restorer", "noise-robust")
SECRET = b"benchmark-secret-not-for-production"  # a benchmark's secret: public on purpose


INNOCENT_QUERIES, INNOCENT_EPOCHS = 5000, 10


def innocent_clone(run: Run, i: int):
    """The i-th clone of the *unwatermarked* victim: 5k pool images of its own draw, labelled by
    the victim's posteriors (even i) or its argmax (odd i), 10 epochs. The most dangerous kind of
    innocent, since it imitates the victim itself; cached per scenario and i (it saw no key)."""
    model = run.clone_spec.build(run.card.input_shape, run.card.num_classes)
    cache = paths.clones_dir()
    path = None if cache is None else cache / "innocents" / f"{run.scenario.name}-{i}.safetensors"
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    pool = query_pool(run.scenario).images
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(7000 + i))[
        :INNOCENT_QUERIES
    ]
    targets = clean_posteriors(run.victim, pool[pick])
    if i % 2:
        targets = targets.argmax(1)
    fit(
        model,
        pool[pick],
        targets,
        run.clone_spec.training.model_copy(update={"epochs": INNOCENT_EPOCHS, "seed": 7000 + i}),
        show_progress=False,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return model.eval()


def key_groups(sets) -> list[list[str]]:
    """The evidence sets of each multi-key thief's API keys (``<thief>+i/<attack>``), one group
    per thief and attack: its pooled test (``name_the_thief(groups=)``), named ``"a,b,…"``."""
    groups: dict[str, list[str]] = {}
    for name in sets:
        client, _, attack = name.partition("/")
        if "+" in client:
            groups.setdefault(f"{owner(name)}/{attack}", []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tests_of(model, evidence, watermarks) -> dict:
    tests = name_the_thief(model, evidence, watermarks, groups=key_groups(watermarks))
    return {
        t.client: {
            "p_value": t.p_value,
            "corrected_p_value": t.corrected_p_value,
            "named": t.named,
            "match_p_value": t.match_p_value,
            "matches": t.matches,
            "images": t.images,
            "buckets": t.buckets,
            "expected": round(t.expected, 2),
            "statistic": "rank",
            "score": t.score,
            "expected_score": round(t.expected_score, 2),
            "probability_p_value": t.probability_p_value,
        }
        for t in tests
    }


def prune(model, fraction: float):
    """Global magnitude pruning of the weights (not biases) of every conv and linear layer."""
    pruned = copy.deepcopy(model)
    weights = [
        m.weight for m in pruned.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    threshold = torch.cat([w.detach().abs().flatten() for w in weights]).quantile(fraction)
    with torch.no_grad():
        for w in weights:
            w.mul_((w.abs() > threshold).to(w.dtype))
    return pruned.eval()


class Run:
    def __init__(self, args: argparse.Namespace, scenario_name: str, seed: int) -> None:
        self.scenario = get_scenario(scenario_name)
        self.seed = seed
        self.victim, self.card, _ = get_victim(self.scenario)
        # one watermark, or layers (a JSON list): each layer its own key and evidence set, "<set>#i"
        self.layers = watermark_layers(json.loads(args.watermark))
        self.secret = SECRET + f"/{seed}".encode()
        self.keys = {c: derive_key(self.secret, c) for c in CLIENTS}
        self.train = load_dataset(self.scenario.victim_dataset).train
        # density_cap's benign stand-in: the victim's training images (on fmnist-id they hold the
        # thief's pool too, which only makes the thief's buckets look denser: against the defender)
        capped = capped_layers(self.layers)
        self.reference = fourier_features(self.train.images, capped[0]) if capped else None
        self.watermarks: dict[str, KeyedWatermark] = {}
        for c, k in self.keys.items():
            self.watermarks.update(
                layered_watermarks(k, c, self.layers, self.card.num_classes, self.reference)
            )
        # one evidence set per attack ("<client>/<attack>"): what that thief's own queries left
        self.evidence = Evidence(max_items=4096)
        sweep = load_config("worst_case")
        self.clone_spec = CloneSpec.like(self.card, training=sweep.clone_training)
        self.attack = args.attack
        self.budget = args.budget or {"knockoff": 15000, "jbda": 6400}[args.attack]
        # this benchmark's clones (of watermarked APIs) apart from the sweeps' (of
        # unwatermarked ones)
        self.own_clones = None if paths.clones_dir() is None else paths.clones_dir() / "ownership"
        self.test = load_dataset(self.scenario.victim_dataset).test

    @property
    def label(self) -> str:
        """The watermark as the JSON lines record it (one layer: its config, as before layers)."""
        if len(self.layers) == 1:
            return self.layers[0].model_dump_json()
        return json.dumps([layer.model_dump() for layer in self.layers], separators=(",", ":"))

    def carried(self, client: str, images) -> list[float]:
        """The share of ``images`` each of ``client``'s layers carries when the victim answers
        them (on fresh copies of the layers: templates fill as served)."""
        fresh = layered_watermarks(
            self.keys[client], client, self.layers, self.card.num_classes, self.reference
        )
        served, shares = clean_posteriors(self.victim, images), []
        for watermark in fresh.values():
            served, marks = watermark.apply(images, served)
            shares.append(float(marks.carried.float().mean()))
        return shares

    def defense(self, client: str, session: str):
        """``client``'s watermark; its carried queries recorded as evidence set ``session`` (its
        layers' as ``session#i``)."""
        for i in range(len(self.layers)):
            self.watermarks[layer_name(session, i)] = self.watermarks[layer_name(client, i)]
        return create_defense(
            "watermarked",
            key=self.keys[client],
            client=session,
            config=self.layers,
            evidence=self.evidence,
            benign_reference=self.reference,
        )

    def steal(self, client: str, variant: str | None, session: str, **params):
        if variant is not None:
            params = {**variant_params(variant), **params}
        keys = params.get("api_keys", 1)
        if keys == 1:
            api = InProcessAPI(self.victim, self.defense(client, session))
        else:  # one API key per view, each with its own watermark key and evidence set, as served
            clients = [f"{client}+{i}" for i in range(keys)]
            for c in clients:
                self.keys.setdefault(c, derive_key(self.secret, c))
                for name, watermark in layered_watermarks(
                    self.keys[c], c, self.layers, self.card.num_classes, self.reference
                ).items():
                    self.watermarks.setdefault(name, watermark)
            api = [
                InProcessAPI(
                    self.victim, self.defense(c, f"{c}/{session.partition('/')[2]}"), client=c
                )
                for c in clients
            ]
        params = tell_restorer(
            params,
            "watermarked",
            {"client": client, "config": [layer.model_dump() for layer in self.layers]},
        )
        attack = create_attack(self.attack, **params)
        seed = self.seed + (100 if client != "alice" else 0)
        clone_spec = self.clone_spec.model_copy(update={"cache": self.own_clones})
        return attack.run(
            api,
            self.budget,
            attack_data(self.scenario, self.attack),
            clone_spec,
            seed=seed,
            labelled=attacker_labels(self.scenario, attack.params.align_labels, seed),
        )

    def entry(self, model, thief: str | None, **extra) -> dict:
        """The model's tests against every evidence set so far. ``right``: every named set is the
        thief's key's; ``named_thief``: the thief's own set is named; ``falsely_named``: sets of
        other keys that are named."""
        sets = {s: w for s, w in self.watermarks.items() if "/" in s}
        tests = tests_of(model, self.evidence, sets)
        false = sorted(s for s, t in tests.items() if t["named"] and owner(s) != thief)
        return {
            **extra,
            "clone_accuracy": accuracy(model, self.test),
            "thief": thief,
            "named_thief": thief is not None
            and any(t["named"] for s, t in tests.items() if owner(s) == thief),
            "falsely_named": false,
            "tests": tests,
        }


def evaluate(args: argparse.Namespace, run: Run, done: set) -> None:
    """Every entry of one (scenario, seed), each written as soon as it is done."""
    scenario, seed = run.scenario.name, run.seed
    wm = run.label

    def record(name: str, make) -> None:
        if (scenario, seed, wm, name) in done:
            return
        start = time.perf_counter()
        row = make()
        row.update(
            scenario=scenario,
            seed=seed,
            watermark=wm,
            entry=name,
            seconds=round(time.perf_counter() - start, 1),
            provenance=provenance(args),
        )
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
        summary = (
            row.get("falsely_named")
            if "models" in row
            else {
                c: f"{t['p_value']:.2g}{'*' if t['named'] else ''}"
                for c, t in row.get("tests", {}).items()
            }
        )
        log.info("%s seed %d %s: %s", scenario, seed, name, summary)

    def defender() -> dict:
        served = defended_accuracy(
            run.victim, run.defense("carol", "carol/benign test set"), run.test
        )
        pool = query_pool(run.scenario).images[:15000]
        return {
            "clean_accuracy": served.clean_accuracy,
            "watermarked_accuracy": served.defended_accuracy,
            "cost_points": 100 * (served.clean_accuracy - served.defended_accuracy),
            **carried_shares("carried_test", run.carried("carol", run.test.images)),
            **carried_shares("carried_pool", run.carried("carol", pool)),
        }

    record("defender", defender)
    # Every attack runs again on a resume (its clone comes from the cache), so that its queries
    # reach the evidence before any entry is tested against it. bob, a thief with another key,
    # first.
    # JBDA (whose queries are its own synthetic images): alice's attackers only.
    only_attacks = args.attacks_only or run.attack != "knockoff"
    bob = None if only_attacks else run.steal("bob", "hard-label", "bob/knockoff hard-label")
    clones = {}
    for variant in args.attackers:
        clones[variant] = run.steal("alice", variant, f"alice/{run.attack} {variant}")
    for variant, result in clones.items():
        record(
            f"{run.attack}/{variant} via alice",
            lambda result=result: run.entry(result.clone, "alice", queries=result.queries),
        )
    if only_attacks:
        return
    vote = run.steal(
        "alice", None, "alice/jitter-and-vote", hard_labels=True, repeats=5, jitter=0.02
    )
    record("knockoff/hard-label via bob", lambda: run.entry(bob.clone, "bob", queries=bob.queries))
    record(
        "removal: jitter-and-vote extraction (5 copies)",
        lambda: run.entry(vote.clone, "alice", queries=vote.queries),
    )

    base = clones["hard-label"].clone if "hard-label" in clones else None
    if base is not None:
        for size in (1000, 6000):

            def finetune(size=size) -> dict:
                tuned = copy.deepcopy(base)
                pick = torch.randperm(
                    len(run.train.images), generator=torch.Generator().manual_seed(seed)
                )[:size]
                fit(
                    tuned,
                    run.train.images[pick],
                    run.train.labels[pick],
                    TrainConfig(epochs=10, lr=0.01, schedule="cosine", seed=seed),
                    show_progress=False,
                )
                return run.entry(tuned, "alice", removal=f"fine-tune {size}")

            record(f"removal: fine-tune {size} labelled", finetune)
        for fraction in (0.3, 0.6):
            record(
                f"removal: prune {int(fraction * 100)}%",
                lambda fraction=fraction: run.entry(prune(base, fraction), "alice"),
            )

        def distill() -> dict:
            student = run.clone_spec.build(run.card.input_shape, run.card.num_classes)
            pool = query_pool(run.scenario).images[: run.budget]
            with torch.no_grad():
                targets = torch.cat([torch.softmax(base(c), 1) for c in pool.split(1024)])
            fit(
                student,
                pool,
                targets,
                run.clone_spec.training.model_copy(update={"seed": seed + 7}),
                show_progress=False,
            )
            return run.entry(student, "alice")

        record("removal: distill into a fresh model", distill)

    def innocents() -> dict:
        models = {}
        for directory in sorted((REPO / "results" / "models" / "victims").iterdir()):
            model, card = load_checkpoint(directory)
            if (
                tuple(card.input_shape) == tuple(run.card.input_shape)
                and card.num_classes == run.card.num_classes
            ):
                models[f"victim {directory.name}"] = model
        cache = paths.clones_dir()
        for weights in sorted(cache.glob("*.safetensors"))[: args.innocent_clones] if cache else []:
            model = run.clone_spec.build(run.card.input_shape, run.card.num_classes)
            try:
                model.load_state_dict(load_file(str(weights)))
            except RuntimeError:
                continue
            models[f"clone {weights.stem}"] = model.eval()
        for i in range(args.innocent_distilled):
            models[f"distilled {i} ({'soft' if i % 2 == 0 else 'hard'} labels)"] = innocent_clone(
                run, i
            )
        sets = {s: w for s, w in run.watermarks.items() if "/" in s}
        out = {name: tests_of(model, run.evidence, sets) for name, model in models.items()}
        named = sorted(n for n, t in out.items() if any(v["named"] for v in t.values()))
        smallest = min(v["p_value"] for t in out.values() for v in t.values())
        return {
            "models": len(out),
            "falsely_named": named,
            "smallest_p_value": smallest,
            "tests": out,
        }

    record("innocent models", innocents)


def carried_shares(field: str, shares: list[float]) -> dict:
    """``{field: share}`` of a single layer (as before layers), or the layers' shares and, in
    ``field``, the first layer's."""
    return {field: shares[0]} if len(shares) == 1 else {field: shares[0], f"{field}_layers": shares}


def owner(evidence_set: str) -> str:
    """The thief behind an evidence set: ``alice`` for ``alice/...`` and for each of her keys
    ``alice+i/...`` (the multi-key attackers)."""
    return evidence_set.split("/")[0].split("+")[0]


def own_set(row: dict) -> str | None:
    """The evidence set of the attack that made this entry's model (removals: the hard-label
    one)."""
    entry = row["entry"]
    for attack in ("knockoff", "jbda"):
        if entry.startswith(f"{attack}/"):
            variant, _, client = entry.removeprefix(f"{attack}/").partition(" via ")
            return f"{client}/{attack} {variant}"
    if "jitter-and-vote" in entry:
        return "alice/jitter-and-vote"
    return "alice/knockoff hard-label" if entry.startswith("removal") else None


def shares(row: dict, field: str) -> str:
    """A defender row's carried share, as a percentage, or each layer's ("0.25 % / 98.6 %")."""
    return " / ".join(f"{100 * share:.2f} %" for share in row.get(f"{field}_layers", [row[field]]))


def own_test(row: dict) -> dict | None:
    """The test of :func:`own_set` that decides: with layers, the smallest p-value among its
    layers' sets (``own#i``), with ``layer`` added; ``None`` when the set was not tested."""
    own = own_set(row)
    tests = [
        ({**t, "layer": int(name.partition(LAYER_SEPARATOR)[2] or 0)})
        for name, t in row.get("tests", {}).items()
        if own is not None and name.partition(LAYER_SEPARATOR)[0] == own
    ]
    return min(tests, key=lambda t: t["p_value"]) if tests else None


def table(path: Path) -> str:
    """The Markdown tables of results/ownership/README.md, from the JSON lines."""
    rows = [json.loads(line) for line in path.open()]
    # runs written side by side interleave their lines: one table per (scenario, seed, watermark)
    # and attack, each in the order its entries were written
    groups = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["seed"], r["watermark"]), []).append(r)
    rows = [r for group in groups.values() for r in group]
    # rows written before the rank score decided were decided by the probability score
    rank_decided = any(
        t.get("statistic") == "rank"
        for r in rows
        for t in r.get("tests", {}).values()
        if isinstance(t, dict)
    )
    decision = "**p (rank)** | p (probability)" if rank_decided else "**p (score)**"
    out = []
    for r in rows:
        if r["entry"] == "defender":
            out.append(
                f"\n**{r['scenario']}, seed {r['seed']}**, watermark `{r['watermark']}`: "
                f"defender accuracy {r['clean_accuracy']:.4f} → {r['watermarked_accuracy']:.4f} "
                f"({r['cost_points']:.2f} points); carried {shares(r, 'carried_test')} of the "
                f"test set, {shares(r, 'carried_pool')} of the pool\n\n| model | clone acc. "
                "| its evidence: images / buckets | argmax matches "
                f"(p) | {decision} | named | falsely named |\n"
                f"|---|---|---|---|---|{'---|' * rank_decided}---|---|"
            )
        elif r["entry"] == "innocent models":
            out.append(
                f"| {r['models']} innocent models (pinned victims; clones of unwatermarked APIs) "
                f"| | | | smallest {r['smallest_p_value']:.2g} | {'| ' * rank_decided}"
                f"| {len(r['falsely_named'])} |"
            )
        elif (own := own_set(r)) is None or own_test(r) is not None:
            t = own_test(r) or {}
            mass = f" {t.get('probability_p_value', 1):.2g} |" if rank_decided else ""
            layer = f" (layer {t['layer']})" if t.get("layer") else ""
            out.append(
                f"| {r['entry']}{layer} | {r['clone_accuracy']:.4f} "
                f"| {t.get('images')} / {t.get('buckets')} | {t.get('matches')} "
                f"({t.get('match_p_value', 1):.2g}) | **{t.get('p_value', 1):.2g}** |{mass} "
                f"{'yes' if r['named_thief'] else 'no'} | {', '.join(r['falsely_named']) or 0} |"
            )
        else:  # a multi-key thief: one evidence set per key it held, "<thief>+i/<attack>"
            client, _, attack = own.partition("/")
            sets = [
                t
                for name, t in sorted(r["tests"].items())
                if owner(name) == client
                and "," not in name
                and name.partition(LAYER_SEPARATOR)[0].endswith("/" + attack)
            ]
            pooled = [
                t
                for name, t in r["tests"].items()
                if "," in name and owner(name) == client and name.endswith("/" + attack)
            ]
            group = (
                f" (pooled: {pooled[0]['p_value']:.2g}{'*' if pooled[0]['named'] else ''})"
                if pooled
                else ""
            )

            def each(field: str, fmt: str = "", sets=sets) -> str:
                return ", ".join(f"{t[field]:{fmt}}" for t in sets)

            mass = f" {each('probability_p_value', '.2g')} |" if rank_decided else ""
            out.append(
                f"| {r['entry']} ({len(sets)} keys) | {r['clone_accuracy']:.4f} "
                f"| {each('images')} / {each('buckets')} | {each('matches')} "
                f"| **{each('p_value', '.2g')}**{group} |{mass} "
                f"{sum(t['named'] for t in sets)} of {len(sets)} keys "
                f"| {', '.join(r['falsely_named']) or 0} |"
            )
    return "\n".join(out)


def summary(path: Path) -> str:
    """One Markdown table of the attacks' p-values: a row per attack and thief, a column per
    (scenario, seed, watermark); each cell the decision's p-value (``*``: named) with the
    probability score's in parentheses."""
    rows = [json.loads(line) for line in path.open()]
    runs = list(dict.fromkeys((r["scenario"], r["seed"], r["watermark"]) for r in rows))
    cells: dict[str, dict] = {}
    for r in rows:
        if r["entry"].startswith(("knockoff/", "jbda/")) and (t := own_test(r)):
            cells.setdefault(r["entry"], {})[(r["scenario"], r["seed"], r["watermark"])] = (
                f"{t['p_value']:.2g}{'*' if r['named_thief'] else ''} "
                f"({t.get('probability_p_value', 1):.2g})"
                + (f" L{t['layer']}" if t.get("layer") else "")
            )
    names = [
        f"{s} seed {seed}" + ("" if sum(x[:2] == (s, seed) for x in runs) == 1 else f" {w}")
        for s, seed, w in runs
    ]
    out = ["| thief | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    for entry, by_run in cells.items():
        out.append(f"| {entry} | " + " | ".join(by_run.get(run, "") for run in runs) + " |")
    return "\n".join(out)


def fractions(args: argparse.Namespace) -> dict:
    """The defender's cost and the evidence a Knockoff thief leaves, against bucket_fraction: no
    clone is trained (three keys per point: the spread over keys is part of the cost)."""
    out = {}
    for scenario_name in args.scenario or ["mnist", "fmnist-id"]:
        scenario = get_scenario(scenario_name)
        victim, card, _ = get_victim(scenario)
        test = load_dataset(scenario.victim_dataset).test
        pool = query_pool(scenario).images[: args.budget or 15000]
        clean = defended_accuracy(victim, None, test).defended_accuracy
        pool_answers = clean_posteriors(victim, pool)
        base = WatermarkConfig(**json.loads(args.watermark))
        # the features depend on frequencies and floor, not on bucket_fraction: computed once
        reference = (
            None
            if base.density_cap is None
            else fourier_features(load_dataset(scenario.victim_dataset).train.images, base)
        )
        for fraction in args.fraction_grid:
            config = WatermarkConfig(**{**base.model_dump(), "bucket_fraction": fraction})
            points = []
            for client in CLIENTS:
                key = derive_key(SECRET + b"/fractions", client)
                served = defended_accuracy(
                    victim,
                    create_defense(
                        "watermarked", key=key, config=config, benign_reference=reference
                    ),
                    test,
                )
                marks = KeyedWatermark(key, card.num_classes, config, reference).marks(
                    pool, pool_answers
                )
                points.append(
                    {
                        "cost_points": 100 * (clean - served.defended_accuracy),
                        "carried_pool": float(marks.carried.float().mean()),
                        "pool_buckets": len(
                            {b for b, c in zip(marks.buckets, marks.carried, strict=True) if c}
                        ),
                    }
                )
            out[f"{scenario_name} {fraction}"] = {
                "scenario": scenario_name,
                "bucket_fraction": fraction,
                "clean_accuracy": clean,
                "keys": points,
            }
            log.info("%s fraction %.2f: %s", scenario_name, fraction, points)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--seed", type=int, action="append", default=None)
    parser.add_argument(
        "--attack",
        choices=("knockoff", "jbda"),
        default="knockoff",
        help="jbda: alice's attackers only (no removal attacks, other thief or innocents)",
    )
    parser.add_argument("--budget", type=int, default=None, help="default: Knockoff 15k, JBDA 6.4k")
    parser.add_argument("--attackers", nargs="+", default=list(ATTACKERS))
    parser.add_argument("--watermark", default="{}", help="WatermarkConfig fields as JSON")
    parser.add_argument(
        "--out", type=Path, default=REPO / "results" / "ownership" / "ownership.jsonl"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--innocent-clones", type=int, default=60, help="clones of the cache to test"
    )
    parser.add_argument(
        "--innocent-distilled",
        type=int,
        default=20,
        help="clones of the unwatermarked victim trained here (cached) to test as innocents",
    )
    parser.add_argument(
        "--attacks-only",
        action="store_true",
        help="only alice's attackers: no other thief, removal attacks or innocent models",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the Markdown tables of --out and exit"
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print one Markdown table of the attacks' p-values per run of --out and exit",
    )
    parser.add_argument(
        "--fractions",
        action="store_true",
        help="cost and evidence against bucket_fraction (no clones) -> --fractions-out",
    )
    parser.add_argument(
        "--fraction-grid", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5]
    )
    parser.add_argument(
        "--fractions-out", type=Path, default=REPO / "results" / "ownership" / "fractions.json"
    )
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.summary:
        print(summary(args.out))
        return
    if args.fractions:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        path = args.fractions_out
        path.write_text(
            json.dumps({"points": fractions(args), "provenance": provenance(args)}, indent=2)
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {
            (r["scenario"], r["seed"], r["watermark"], r["entry"])
            for r in map(json.loads, args.out.open())
        }

    for scenario in args.scenario or ["mnist"]:
        for seed in args.seed or [0]:
            evaluate(args, Run(args, scenario, seed), done)


if __name__ == "__main__":
    main()
