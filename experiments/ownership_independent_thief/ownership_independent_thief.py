"""Ownership against a thief mirage did not write: what a clone trained the ordinary way keeps of
the served function, in distribution (fmnist-id, Knockoff 15k, hard labels).

The thief's clone is this file's own code, nothing of mirage's training: a small batch-norm CNN
(two conv–BN–ReLU–pool blocks, a 128-unit dropout layer), Adam (lr 1e-3), random ±2-pixel shifts,
at most 10 epochs, early-stopped on a 10 % held-out split of its transfer set (patience 2). Two
questions, per seed (the seed draws the thief's 15k queries from the training pool and seeds its
training):

* **Does it copy the victim's own mistakes?** On the victim's errors on the test set (no model
  trained on any of them), how often a model gives the victim's wrong label: the thief (labels =
  the victim's argmax), an innocent trained on the *same images* with their true labels, and an
  innocent trained on 15k other pool images with true labels. A model-level fingerprint of the
  victim's errors (SAC-w's idea) needs the thief well above the innocents.
* **Does it learn keyed tie-breaks?** Where the victim's top two probabilities differ by at most
  ``--gap``, the served top-1 is the one of the two a key picks for the *bucket*: the unordered
  pair (``pair``), or the pair and the third class (``pair+third``); the probabilities of the two
  are swapped, nothing else changes. Consistent over a whole region of answers, this is no
  isolated keyed label. Verification uses the defender's own near-tie images (test set and the
  unqueried pool): the statistic counts probes where the suspect ranks the key's pick above the
  other class, and its exact p-value is that of :func:`mirage.ownership.verification.exact_tail`
  with the key's choices uniform per bucket. Tested against the thief's key (alice) and a key it
  never used (bob).

Results are JSON lines of results/ownership/independent_thief.jsonl, one per (seed, model),
skipped when present (resumable)::

    .venv/bin/python experiments/ownership_independent_thief/ownership_independent_thief.py \\
        --seeds 0 1 2
    .venv/bin/python experiments/ownership_independent_thief/ownership_independent_thief.py --table
    .venv/bin/python experiments/ownership_independent_thief/ownership_independent_thief.py \\
        --seeds 0 1 2 --labels-only

``--ood`` asks the same of the ``mnist`` scenario (Fashion-MNIST queries) and the README's
out-of-distribution watermark (answer buckets, templates), one JSON line per (seed, model) of
results/ownership/independent_thief_ood.jsonl::

    .venv/bin/python experiments/ownership_independent_thief/ownership_independent_thief.py \\
        --ood --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, provenance

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.data import load_dataset
from mirage.models.base import clean_posteriors
from mirage.ownership.verification import exact_tail
from mirage.scenarios import get_scenario, query_pool
from mirage.training.victim import get_victim

OUT = REPO / "results" / "ownership" / "independent_thief.jsonl"
QUERIES = 15_000
KEYS = {"alice": b"alice-benchmark-key-public", "bob": b"bob-benchmark-key-public-"}


class ThiefNet(nn.Module):
    """The outside thief's network: no LeNet, batch norm, dropout."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(128, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def train_thief(x: Tensor, y: Tensor, seed: int, epochs: int = 10) -> nn.Module:
    """Adam, shifts, early stopping on a held-out tenth (patience 2): an ordinary recipe."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held = len(x) // 10
    vx, vy, tx, ty = x[order[:held]], y[order[:held]], x[order[held:]], y[order[held:]]
    model, best, best_state, stale = ThiefNet(), -1.0, None, 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(tx), generator=generator).split(128):
            dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
            loss = F.cross_entropy(model(torch.roll(tx[batch], (dx, dy), (2, 3))), ty[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(vx).argmax(1) == vy).float().mean().item()
        if accuracy > best:
            best, stale = accuracy, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= 2:
                break
    model.load_state_dict(best_state)
    return model.eval()


def bucket_ids(probs: Tensor, kind: str) -> tuple[Tensor, list[str]]:
    """(the answers' top-two pairs in class order (B, 2), their bucket ids)."""
    top = probs.topk(3, dim=1).indices
    pairs = top[:, :2].sort(dim=1).values
    ids = [
        f"{a}-{b}" + (f"-{c}" if kind == "pair+third" else "")
        for (a, b), c in zip(pairs.tolist(), top[:, 2].tolist(), strict=True)
    ]
    return pairs, ids


def keyed_pick(key: bytes, bucket: str) -> int:
    """Which of the bucket's two classes (0: the lower, 1: the higher) the key prefers."""
    return hmac.new(key, bucket.encode(), hashlib.sha256).digest()[0] & 1


def near_ties(probs: Tensor, gap: float) -> Tensor:
    top = probs.topk(2, dim=1).values
    return top[:, 0] - top[:, 1] <= gap


def tie_broken(probs: Tensor, key: bytes, kind: str, gap: float) -> Tensor:
    """The served answers: on near-ties, the key's pick of the pair on top (the two swapped)."""
    served = probs.clone()
    pairs, ids = bucket_ids(probs, kind)
    for row in torch.nonzero(near_ties(probs, gap)).flatten().tolist():
        pick = int(pairs[row, keyed_pick(key, ids[row])])
        top = int(probs[row].argmax())
        if pick != top:
            served[row, pick], served[row, top] = probs[row, top], probs[row, pick]
    return served


def tie_test(model: nn.Module, key: bytes, kind: str, probes: Tensor, victim_probs: Tensor):
    """(matches, probes, expected, exact p, buckets) of ``model`` against ``key``'s picks."""
    pairs, ids = bucket_ids(victim_probs, kind)
    with torch.no_grad():
        scores = torch.softmax(model(probes), 1).gather(1, pairs)
    above = F.one_hot((scores[:, 1] > scores[:, 0]).long(), 2)
    labels = {bucket: keyed_pick(key, bucket) for bucket in set(ids)}
    observed, expected, p = exact_tail(above, ids, labels)
    return observed, len(ids), expected, p, len(labels)


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--seeds", type=int, nargs="+", default=[0])
    arguments.add_argument("--gap", type=float, default=0.3, help="near-tie: top-2 gap at most")
    arguments.add_argument("--threads", type=int, default=1)
    arguments.add_argument("--table", action="store_true", help="print the table and stop")
    arguments.add_argument(
        "--labels-only",
        action="store_true",
        help="print how often the victim's label on each seed's queries is the true one, and stop",
    )
    arguments.add_argument(
        "--ood",
        action="store_true",
        help="the mnist scenario with the answer-bucket watermark instead (independent_thief_ood)",
    )
    args = arguments.parse_args()
    if args.table:
        return table()
    torch.set_num_threads(args.threads)
    if args.ood:
        return out_of_distribution(args.seeds)
    scenario = get_scenario("fmnist-id")
    victim = get_victim(scenario, train=False)[0].eval()
    pool, test = query_pool(scenario), load_dataset(scenario.victim_dataset).test
    if args.labels_only:
        for seed in args.seeds:
            order = torch.randperm(len(pool.images), generator=torch.Generator().manual_seed(seed))
            mine = order[:QUERIES]
            truth = clean_posteriors(victim, pool.images[mine]).argmax(1) == pool.labels[mine]
            print(f"seed {seed}: the victim's label is the true one on {truth.float().mean():.4f}")
        return None
    done = set()
    if OUT.exists():
        done = {(r["seed"], r["model"]) for r in map(json.loads, OUT.read_text().splitlines())}
    victim_test = clean_posteriors(victim, test.images)
    errors = victim_test.argmax(1) != test.labels
    for seed in args.seeds:
        order = torch.randperm(len(pool.images), generator=torch.Generator().manual_seed(seed))
        mine, other, unqueried = order[:QUERIES], order[QUERIES : 2 * QUERIES], order[QUERIES:]
        x = pool.images[mine]
        answers = clean_posteriors(victim, x)
        probe_probs = torch.cat([victim_test, clean_posteriors(victim, pool.images[unqueried])])
        probe_images = torch.cat([test.images, pool.images[unqueried]])
        ties = near_ties(probe_probs, args.gap)
        models = {
            "thief": (x, answers.argmax(1), None),
            "innocent, same images, true labels": (x, pool.labels[mine], None),
            "innocent, other images, true labels": (
                pool.images[other],
                pool.labels[other],
                None,
            ),
            "thief of keyed tie-breaks (pair)": (x, None, "pair"),
            "thief of keyed tie-breaks (pair+third)": (x, None, "pair+third"),
        }
        for name, (images, labels, kind) in models.items():
            if (seed, name) in done:
                continue
            start = time.perf_counter()
            row: dict = {"seed": seed, "model": name, "gap": args.gap}
            if kind is not None:
                served_test = tie_broken(victim_test, KEYS["alice"], kind, args.gap)
                row |= {
                    "defender_accuracy": (victim_test.argmax(1) == test.labels)
                    .float()
                    .mean()
                    .item(),
                    "served_accuracy": (served_test.argmax(1) == test.labels).float().mean().item(),
                    "carried_queries": near_ties(answers, args.gap).float().mean().item(),
                }
                labels = tie_broken(answers, KEYS["alice"], kind, args.gap).argmax(1)
            model = train_thief(images, labels, seed)
            with torch.no_grad():
                predictions = model(test.images).argmax(1)
            row |= {
                "accuracy": (predictions == test.labels).float().mean().item(),
                "agrees_with_victim": (predictions == victim_test.argmax(1)).float().mean().item(),
                "victim_errors": int(errors.sum()),
                "copies_victim_errors": (predictions[errors] == victim_test.argmax(1)[errors])
                .float()
                .mean()
                .item(),
            }
            for kind_tested in ("pair", "pair+third"):
                for client, key in KEYS.items():
                    observed, n, expected, p, buckets = tie_test(
                        model, key, kind_tested, probe_images[ties], probe_probs[ties]
                    )
                    row[f"ties[{kind_tested}] via {client}"] = {
                        "matches": observed,
                        "probes": n,
                        "expected": round(expected, 1),
                        "p_value": p,
                        "buckets": buckets,
                    }
            row |= {"seconds": time.perf_counter() - start, "provenance": provenance(args)}
            with OUT.open("a") as out:
                out.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)


OOD_OUT = REPO / "results" / "ownership" / "independent_thief_ood.jsonl"
OOD_WATERMARK = {"buckets": "answer", "bucket_fraction": 1.0, "tie_gap": 0.3, "template": 0.9}
SECRET = b"independent-thief-benchmark-secret"  # a benchmark's secret: public on purpose


def out_of_distribution(seeds: list[int]) -> None:
    """``mnist``: the MNIST-digit victim served through the README's out-of-distribution
    watermark (answer buckets and templates) to alice; the thief sends 15k Fashion-MNIST images
    through alice's key and trains its own clone on the argmax; an innocent trains the same way on
    the *unwatermarked* victim's argmax of the same images; bob, an honest client, sends 5k other
    images through his own key. Each model is tested against alice's and bob's keys, each on that
    client's evidence, with the exact test (α = 1e-6 after correcting for 2 keys)."""
    from mirage.defenses import create_defense
    from mirage.ownership import (
        Evidence,
        KeyedWatermark,
        WatermarkConfig,
        derive_key,
        name_the_thief,
    )

    scenario = get_scenario("mnist")
    victim = get_victim(scenario, train=False)[0].eval()
    pool, test = query_pool(scenario), load_dataset(scenario.victim_dataset).test
    config = WatermarkConfig.model_validate(OOD_WATERMARK)
    done = set()
    if OOD_OUT.exists():
        done = {(r["seed"], r["model"]) for r in map(json.loads, OOD_OUT.read_text().splitlines())}
    clean_test = clean_posteriors(victim, test.images)
    for seed in seeds:
        order = torch.randperm(len(pool.images), generator=torch.Generator().manual_seed(seed))
        x = pool.images[order[:QUERIES]]
        clean = clean_posteriors(victim, x)
        evidence = Evidence(max_items=QUERIES)
        defense = create_defense(
            "watermarked",
            key=derive_key(SECRET, "alice"),
            client="alice",
            config=config,
            evidence=evidence,
        )
        served = torch.cat(
            [defense(xs, cs) for xs, cs in zip(x.split(256), clean.split(256), strict=True)]
        )
        # bob, an honest client with his own key, sends 5k other images: his evidence set is
        # where a clone made through alice's key must never be named
        bob = create_defense(
            "watermarked",
            key=derive_key(SECRET, "bob"),
            client="bob",
            config=config,
            evidence=evidence,
        )
        others = pool.images[order[QUERIES : QUERIES + 5000]]
        for xs in others.split(256):
            bob(xs, clean_posteriors(victim, xs))
        probe = create_defense(
            "watermarked", key=derive_key(SECRET, "probe"), client="probe", config=config
        )
        served_test = probe(test.images, clean_test)
        watermarks = {
            c: KeyedWatermark(derive_key(SECRET, c), 10, config) for c in ("alice", "bob")
        }
        for name, labels in (("thief", served.argmax(1)), ("innocent", clean.argmax(1))):
            if (seed, name) in done:
                continue
            start = time.perf_counter()
            model = train_thief(x, labels, seed)
            model.num_classes = 10
            tests = {t.client: t for t in name_the_thief(model, evidence, watermarks)}
            with torch.no_grad():
                accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
            row = {
                "seed": seed,
                "model": name,
                "accuracy": accuracy,
                "defender_accuracy": (clean_test.argmax(1) == test.labels).float().mean().item(),
                "served_accuracy": (served_test.argmax(1) == test.labels).float().mean().item(),
                "relabelled_queries": (served.argmax(1) != clean.argmax(1)).float().mean().item(),
                **{
                    f"via {client}": {
                        "images": t.images,
                        "buckets": t.buckets,
                        "corrected_p_value": t.corrected_p_value,
                        "named": t.named,
                    }
                    for client, t in tests.items()
                },
                "seconds": time.perf_counter() - start,
                "provenance": provenance(),
            }
            with OOD_OUT.open("a") as out:
                out.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)


def table() -> None:
    rows = [json.loads(line) for line in OUT.read_text().splitlines()]
    print("| model | seed | test acc. | copies victim's errors | own key: p (pair / pair+third) |")
    print("|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["seed"])):
        kind = "pair+third" if "pair+third" in r["model"] else "pair"
        own = r[f"ties[{kind}] via alice"]["p_value"]
        print(
            f"| {r['model']} | {r['seed']} | {r['accuracy']:.4f} | "
            f"{r['copies_victim_errors']:.3f} | {own:.2g} |"
        )


if __name__ == "__main__":
    main()
