"""The out-of-distribution gate's measurements that need no clone: how well each
out-of-distribution score separates the victim's test set from each attacker's queries (AUROC),
and PRADA's queries-until-alarm per attacker stream and false alarms on benign streams.

Scores (higher = more in-distribution): the victim's max softmax (MSP), max logit, negative
energy (logsumexp of the logits), and the MSP of the outlier-exposure detector adaptive
misinformation trains. Pools: each scenario's Knockoff pool and the real query stream of JBDA and
JB-top3 (6.4k queries, the full protocol's settings, recorded from an undefended API). Models are
the pinned ones of results/models/.

    python experiments/ood_gate/ood_gate_and_prada.py \\
        --json results/ood_gate/ood_gate_and_prada.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, parser, write_json

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.api import InProcessAPI, PradaConfig, PradaDetector
from mirage.attacks import CloneSpec, create_attack
from mirage.data import load_dataset
from mirage.scenarios import get_scenario, query_pool, seed_source
from mirage.training.misinformation_models import get_misinformation_models
from mirage.training.victim import get_victim


class RecordingAPI(InProcessAPI):
    """Keeps every image it was asked, in order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[torch.Tensor] = []

    def query(self, x):
        self.asked.append(x.detach().clone())
        return super().query(x)


@torch.no_grad()
def logits_of(model, x, batch=1024):
    model.eval()
    return torch.cat([model(c) for c in x.split(batch)])


def scores(victim, oe, x) -> dict[str, np.ndarray]:
    z = logits_of(victim, x)
    return {
        "msp": torch.softmax(z, 1).max(1).values.numpy(),
        "max_logit": z.max(1).values.numpy(),
        "neg_energy": torch.logsumexp(z, 1).numpy(),
        "oe_msp": torch.softmax(logits_of(oe, x), 1).max(1).values.numpy(),
    }


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of a test image > score of an attacker query): 1 separates perfectly, 0.5 not at
    all."""
    return float(
        roc_auc_score(np.r_[np.ones(len(inside)), np.zeros(len(outside))], np.r_[inside, outside])
    )


def jbda_stream(name: str, scenario, victim, card, seed: int, budget: int) -> torch.Tensor:
    """The attack's queries against the undefended victim, in order. They depend on its
    per-round substitutes only (the full protocol's recipe), not on the final clone, which is
    trained for one epoch here."""
    api = RecordingAPI(victim, None)
    spec = CloneSpec.like(card)
    clone = spec.model_copy(
        update={"training": spec.training.model_copy(update={"epochs": 1, "seed": seed})}
    )
    create_attack(name).run(api, budget, seed_source(scenario), clone, seed=seed)
    return torch.cat(api.asked)


def mix_in(stream: torch.Tensor, benign: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``stream`` with ``benign`` images inserted at random places, the stream's own order kept."""
    total = len(stream) + len(benign)
    is_benign = torch.zeros(total, dtype=torch.bool)
    is_benign[torch.randperm(total, generator=generator)[: len(benign)]] = True
    mixed = torch.empty((total, *stream.shape[1:]), dtype=stream.dtype)
    mixed[~is_benign], mixed[is_benign] = stream, benign
    return mixed


def until_alarm(
    stream: torch.Tensor, victim, config: PradaConfig, request: int, keys: int = 1
) -> dict:
    """Feed ``stream`` in requests of ``request`` images, round-robin over ``keys`` API keys."""
    detector = PradaDetector(config)
    labels = logits_of(victim, stream).argmax(1)
    first = None
    for i, start in enumerate(range(0, len(stream), request)):
        key = f"key{i % keys}"
        state = detector.observe(
            key, stream[start : start + request], labels[start : start + request]
        )
        if state.alarmed and first is None:
            first = start + request
    states = [detector.state(f"key{k}") for k in range(keys)]
    return {
        "queries_until_first_alarm": first,
        "alarmed_keys": sum(s.alarmed for s in states),
        "final_w": [None if s.statistic is None else round(s.statistic, 4) for s in states],
        "queries": len(stream),
    }


def main() -> None:
    args_parser = parser(
        __doc__,
        threads=True,
        output_default=REPO / "results" / "ood_gate" / "ood_gate_and_prada.json",
    )
    args_parser.add_argument("--budget", type=int, default=6400)
    args_parser.add_argument("--benign-streams", type=int, default=10)
    args_parser.add_argument(
        "--request", type=int, default=64, help="images per request fed to PRADA"
    )
    args = args_parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"auroc": {}, "prada": {}}

    streams: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("fmnist-id", "mnist", "fmnist"):
        scenario = get_scenario(name)
        victim, card, _ = get_victim(scenario)
        oe, _ = get_misinformation_models(scenario)
        test = load_dataset(scenario.victim_dataset, scenario.data_root).test
        inside = scores(victim, oe, test.images)
        pools = {"knockoff_pool": query_pool(scenario).images}
        if name == "fmnist-id":  # the JBDA family's queries do not depend on the Knockoff pool
            for attack in ("jbda", "jb-top3"):
                pools[attack] = jbda_stream(attack, scenario, victim, card, 0, args.budget)
        streams[name] = pools
        out["auroc"][name] = {}
        for pool, images in pools.items():
            outside = scores(victim, oe, images[:20_000])
            out["auroc"][name][pool] = {s: round(auroc(inside[s], outside[s]), 4) for s in inside}
            print(name, pool, out["auroc"][name][pool], flush=True)

    # PRADA on the fmnist victim (fmnist and fmnist-id share it): benign streams, attacker streams,
    # the mixing attacker and the multi-key attacker
    scenario = get_scenario("fmnist-id")
    victim, _, _ = get_victim(scenario)
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    config = PradaConfig()
    generator = torch.Generator().manual_seed(0)
    benign = []
    for s in range(args.benign_streams):
        order = torch.randperm(len(test), generator=generator)
        benign.append(until_alarm(test.images[order], victim, config, args.request))
    out["prada"]["config"] = config.model_dump()
    out["prada"]["benign_10k_test_streams"] = benign
    out["prada"]["false_alarms"] = sum(b["queries_until_first_alarm"] is not None for b in benign)
    attackers = {
        "jbda": streams["fmnist-id"]["jbda"],
        "jb-top3": streams["fmnist-id"]["jb-top3"],
        "knockoff_mnist_pool": streams["fmnist"]["knockoff_pool"][
            torch.randperm(len(streams["fmnist"]["knockoff_pool"]), generator=generator)[:15_000]
        ],
        "knockoff_fmnist_pool": streams["fmnist-id"]["knockoff_pool"][
            torch.randperm(len(streams["fmnist-id"]["knockoff_pool"]), generator=generator)[:15_000]
        ],
    }
    for name, stream in attackers.items():
        out["prada"][name] = until_alarm(stream, victim, config, args.request)
        print("prada", name, out["prada"][name], flush=True)
    for fraction in (0.1, 0.3, 0.5):  # JBDA with benign-looking test images mixed into its stream
        jbda = attackers["jbda"]
        n_benign = int(len(jbda) * fraction / (1 - fraction))
        mixed = mix_in(
            jbda, test.images[torch.randperm(len(test), generator=generator)[:n_benign]], generator
        )
        out["prada"][f"jbda_mixed_{int(fraction * 100)}pct_benign"] = until_alarm(
            mixed, victim, config, args.request
        )
    for keys in (2, 4, 8):  # JBDA spread round-robin over several API keys
        out["prada"][f"jbda_over_{keys}_keys"] = until_alarm(
            attackers["jbda"], victim, config, args.request, keys
        )
    print({k: v for k, v in out["prada"].items() if k != "benign_10k_test_streams"}, flush=True)
    write_json(args.json, out, args)


if __name__ == "__main__":
    main()
