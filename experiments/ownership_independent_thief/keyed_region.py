"""Ownership in distribution through a keyed *region*: does a thief mirage did not write learn it?

In distribution (fmnist-id, the thief's 15k queries drawn from the victim's own training split)
an ordinary, early-stopped clone keeps neither isolated keyed labels nor keyed tie-breaks
(`ownership_independent_thief.py`). Here each API key relabels one coherent region instead:
among the images the victim puts in a keyed class c with confidence ≥ ``--confidence``, those
whose penultimate embedding lies beyond a keyed direction's (1 − ``--share``) quantile (over the
defender's own training images of that class) are answered with a keyed target class t, one of
the four classes least often the victim's runner-up for c. Everything else is answered
truthfully (hard labels). The price is the region's benign share, paid as a consistent error.

The test: the suspect's count of probes in the key's region that it labels t, probes being every
defender image (test set, and training images the thief did not query) in that region. Its
p-value is a Monte Carlo one over keys: the same count for ``--null-keys`` keys drawn as a key
draws its rule, p = (1 + #{null ≥ observed}) / (1 + draws), valid (Phipson & Smyth 2010) since
the suspect never saw those keys; its floor is 1 / (1 + draws).

The thief and the innocents use `ownership_independent_thief.py`'s outside recipe (batch-norm
CNN, Adam, shifts, early stopping): the thief through alice's key, a second thief through bob's
key (tested against alice's: it must not be named), an innocent on the thief's images with their
true labels and one on 15k other training images with true labels. One JSON line per (seed,
model) of results/ownership/keyed_region.jsonl, skipped when present (resumable)::

    .venv/bin/python experiments/ownership_independent_thief/keyed_region.py \
        --seeds 0 1 2 --null-keys 20000
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
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # _harness
from ownership_independent_thief import KEYS, QUERIES, train_thief

from _harness import provenance

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.data import load_dataset
from mirage.scenarios import get_scenario, query_pool
from mirage.training.victim import get_victim

OUT = REPO / "results" / "ownership" / "keyed_region.jsonl"
FAR = 4  # targets: the classes least often the victim's runner-up for the source class


class Victim:
    """The served victim's answers and penultimate embedding (LeNet: the fc(500) + ReLU output)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self._features = model.eval(), {}
        model.body[-1].register_forward_hook(lambda m, i, o: self._features.__setitem__("e", o))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        probs, embeddings = [], []
        with torch.no_grad():
            for batch in x.split(2000):
                probs.append(torch.softmax(self.model(batch), 1))
                embeddings.append(self._features["e"])
        return torch.cat(probs), torch.cat(embeddings)


class RegionRules:
    """Keyed region rules (class c, target t, direction w, threshold τ), drawn the same way for a
    real key (from its HMAC) and for the null's keys (from a generator)."""

    def __init__(self, ref_probs: Tensor, ref_emb: Tensor, share: float, confidence: float):
        self.share, self.confidence = share, confidence
        self.ref_probs, self.ref_emb = ref_probs, ref_emb
        top2 = ref_probs.topk(2, 1).indices
        runner_up = torch.zeros(10, 10)
        runner_up.index_put_((top2[:, 0], top2[:, 1]), torch.ones(len(top2)), accumulate=True)
        runner_up = runner_up + runner_up.T
        runner_up.fill_diagonal_(float("inf"))
        self.far = runner_up.argsort(1)[:, :FAR]

    def confident(self, probs: Tensor, c: int) -> Tensor:
        return (probs.argmax(1) == c) & (probs.max(1).values >= self.confidence)

    def draw(self, generator: torch.Generator, count: int):
        """``count`` rules: classes (count,), targets (count,), directions (count, d)."""
        classes = torch.randint(0, 10, (count,), generator=generator)
        targets = self.far[classes, torch.randint(0, FAR, (count,), generator=generator)]
        directions = torch.randn(count, self.ref_emb.shape[1], generator=generator)
        return classes, targets, directions

    def thresholds(self, c: int, directions: Tensor) -> Tensor:
        scores = self.ref_emb[self.confident(self.ref_probs, c)] @ directions.T
        return torch.quantile(scores, 1 - self.share, dim=0)

    def for_key(self, key: bytes):
        seed = int.from_bytes(hmac.new(key, b"keyed-region", hashlib.sha256).digest()[:8], "big")
        classes, targets, directions = self.draw(torch.Generator().manual_seed(seed), 1)
        c = int(classes[0])
        return c, int(targets[0]), directions[0], float(self.thresholds(c, directions)[0])

    def inside(self, probs: Tensor, emb: Tensor, rule) -> Tensor:
        c, _, w, tau = rule
        return self.confident(probs, c) & (emb @ w >= tau)

    def served_labels(self, probs: Tensor, emb: Tensor, rule) -> Tensor:
        labels = probs.argmax(1).clone()
        labels[self.inside(probs, emb, rule)] = rule[1]
        return labels

    def null_counts(self, probes_p, probes_e, predictions, draws: int, seed: int) -> Tensor:
        """The statistic for ``draws`` keys drawn as keys draw their rule."""
        classes, targets, directions = self.draw(torch.Generator().manual_seed(seed), draws)
        counts = torch.zeros(draws, dtype=torch.long)
        for c in range(10):
            chosen = torch.nonzero(classes == c).flatten()
            members = self.confident(probes_p, c)
            for part in chosen.split(2000):
                taus = self.thresholds(c, directions[part])
                inside = probes_e[members] @ directions[part].T >= taus
                hit = predictions[members].unsqueeze(1) == targets[part].unsqueeze(0)
                counts[part] = (inside & hit).sum(0)
        return counts


def predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(batch).argmax(1) for batch in x.split(2000)])


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--seeds", type=int, nargs="+", default=[0])
    arguments.add_argument("--share", type=float, default=0.05, help="of the key's class")
    arguments.add_argument("--confidence", type=float, default=0.9)
    arguments.add_argument("--null-keys", type=int, default=200_000)
    arguments.add_argument("--threads", type=int, default=2)
    arguments.add_argument("--out", type=Path, default=OUT)
    args = arguments.parse_args()
    torch.set_num_threads(args.threads)
    scenario = get_scenario("fmnist-id")
    victim = Victim(get_victim(scenario, train=False)[0])
    data = load_dataset("fmnist")
    pool = query_pool(scenario)
    rules = RegionRules(*victim(data.train.images), args.share, args.confidence)
    alice, bob = rules.for_key(KEYS["alice"]), rules.for_key(KEYS["bob"])
    test_p, test_e = victim(data.test.images)
    served = rules.served_labels(test_p, test_e, alice)
    cost = float((test_p.argmax(1) == data.test.labels).float().mean()) - float(
        (served == data.test.labels).float().mean()
    )
    done = set()
    if args.out.exists():
        done = {(r["seed"], r["model"]) for r in map(json.loads, args.out.open())}
    for seed in args.seeds:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        queried, other = order[:QUERIES], order[QUERIES : 2 * QUERIES]
        unqueried = torch.ones(len(pool), dtype=torch.bool)
        unqueried[queried] = False
        probes = torch.cat([data.train.images[unqueried], data.test.images])
        probes_p, probes_e = victim(probes)
        in_region = rules.inside(probes_p, probes_e, alice)
        q_p, q_e = victim(pool.images[queried])
        x_queried = pool.images[queried]
        training_sets = {  # the model -> (its images, their labels, its training seed)
            "thief via alice": (x_queried, rules.served_labels(q_p, q_e, alice), seed),
            "thief via bob": (x_queried, rules.served_labels(q_p, q_e, bob), seed),
            "innocent: the thief's images, true labels": (
                x_queried,
                pool.labels[queried],
                seed + 100,
            ),
            "innocent: other images, true labels": (
                pool.images[other],
                pool.labels[other],
                seed + 200,
            ),
        }
        for name, (images, labels, training_seed) in training_sets.items():
            if (seed, name) in done:
                continue
            start = time.perf_counter()
            model = train_thief(images, labels, training_seed)
            predictions = predict(model, probes)
            observed = int((predictions[in_region] == alice[1]).sum())
            null = rules.null_counts(probes_p, probes_e, predictions, args.null_keys, seed + 7)
            p = (1 + int((null >= observed).sum())) / (1 + args.null_keys)
            row = {
                "seed": seed,
                "model": name,
                "accuracy": float(
                    (predict(model, data.test.images) == data.test.labels).float().mean()
                ),
                "region": {"class": alice[0], "target": alice[1], "probes": int(in_region.sum())},
                "hits": observed,
                "null": {
                    "mean": float(null.float().mean()),
                    "max": int(null.max()),
                    "draws": args.null_keys,
                },
                "p": p,
                "defender_cost_points": round(100 * cost, 2),
                "carried_test_images": int(rules.inside(test_p, test_e, alice).sum()),
                "thief_queries_carried": int(rules.inside(q_p, q_e, alice).sum()),
                "share": args.share,
                "confidence": args.confidence,
                "seconds": round(time.perf_counter() - start, 1),
                **provenance(),
            }
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
