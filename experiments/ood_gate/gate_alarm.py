"""The out-of-distribution gate as a per-client stream detector (``grad2_gated``'s ``alarm_rate``),
measured without a clone: after how many queries each attacker's stream alarms, how many of its
answers were true labels by then (queries the gate let through before the alarm), false alarms on
benign streams (each a shuffle of the whole test set: 2,000 images on mnist, 10,000 on fmnist-id),
what spreading the budget over many API keys buys (each key is its own stream), and what replaying a
few in-distribution images to dilute the stream buys.

The defense is built from the ``worst_case`` profile's point ``grad2-gated-scramble-alarm`` by the
sweep's own resolver, with the pinned models of results/models/; every stream is judged by
``GatedGrad2.attacker_like`` and ``GatedGrad2.observe_stream``, the code that serves it. Requests
are of ``--request`` images.

    python experiments/ood_gate/gate_alarm.py --json results/ood_gate/gate_alarm.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from ood_gate_and_prada import jbda_stream

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, parser, write_json

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.api import clean_posteriors
from mirage.bench.config import load_config
from mirage.data import load_dataset
from mirage.scenarios import get_scenario, query_pool
from mirage.training.resolve import DefenseSpec, resolve_defense
from mirage.training.victim import get_victim

POINT = "grad2-gated-scramble-alarm"


def gated_defense(scenario_name: str):
    """The profile's alarmed gate for ``scenario_name``, resolved as the sweep resolves it."""
    entry = next(d for d in load_config("worst_case").defenses if d.display == POINT)
    (params,) = entry.points(scenario_name)
    scenario = get_scenario(scenario_name)
    victim, card, _ = get_victim(scenario)
    return victim, resolve_defense(
        DefenseSpec.from_params(entry.name, params), scenario, victim, card
    )


def run_stream(
    defense,
    victim,
    stream: torch.Tensor,
    request: int,
    keys: int = 1,
    counted: torch.Tensor | None = None,
) -> dict:
    """Feed ``stream`` in requests round-robin over ``keys`` fresh clients; per client the alarm
    position, and in all the answers served truthfully (not flagged, before the alarm) to the
    queries ``counted`` marks (all by default: not the images an attacker replays, whose labels
    it knows)."""
    probs = clean_posteriors(victim, stream)
    counted = torch.ones(len(stream), dtype=torch.bool) if counted is None else counted
    clients = [defense.for_new_client() for _ in range(keys)]
    truthful = 0
    for i, start in enumerate(range(0, len(stream), request)):
        client = clients[i % keys]
        x, p = stream[start : start + request], probs[start : start + request]
        served_truthfully = ~client.observe_stream(client.attacker_like(x, p))
        truthful += int((served_truthfully & counted[start : start + request]).sum())
    alarms = [c.alarm_at for c in clients]
    return {
        "queries": len(stream),
        "keys": keys,
        "alarmed_keys": sum(a is not None for a in alarms),
        "first_alarm_at": min((a for a in alarms if a is not None), default=None),
        "median_alarm_at": (
            sorted(a for a in alarms if a is not None)[sum(a is not None for a in alarms) // 2]
            if any(a is not None for a in alarms)
            else None
        ),
        "truthful_answers": truthful,
        "flagged": sum(c.queries_flagged for c in clients),
    }


def main() -> None:
    args_parser = parser(
        __doc__, threads=True, output_default=REPO / "results" / "ood_gate" / "gate_alarm.json"
    )
    args_parser.add_argument("--request", type=int, default=64)
    args_parser.add_argument("--benign-streams", type=int, default=10)
    args_parser.add_argument("--budget", type=int, default=15_000)
    args_parser.add_argument(
        "--alarm-rates",
        type=float,
        nargs="+",
        default=[0.1, 0.03],
        help="the benign flag rates the alarm tests against (the profile's first)",
    )
    args = args_parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    out: dict = {"point": POINT, "request": args.request}
    for name in ("mnist", "fmnist-id"):
        victim, profile_defense = gated_defense(name)
        scenario = get_scenario(name)
        test = load_dataset(scenario.victim_dataset, scenario.data_root).test
        pool = query_pool(scenario).images
        knockoff = pool[torch.randperm(len(pool), generator=generator)[: args.budget]]
        benign_orders = [
            torch.randperm(len(test), generator=generator) for _ in range(args.benign_streams)
        ]
        # an attacker holding 100 in-distribution images (the aligned attacker's labelled set)
        # replays them to dilute its stream: that fraction of the budget, shuffled in
        held = test.images[torch.randperm(len(test), generator=generator)[:100]]
        diluted = {}
        for fraction in (0.5, 0.8, 0.9, 0.95):
            n_held = int(args.budget * fraction)
            mixed = torch.cat(
                [knockoff[: args.budget - n_held], held.repeat(n_held // 100 + 1, 1, 1, 1)[:n_held]]
            )
            is_pool = torch.arange(len(mixed)) < args.budget - n_held
            order = torch.randperm(len(mixed), generator=generator)
            diluted[f"knockoff_replaying_100_images_{int(fraction * 100)}pct"] = (
                mixed[order],
                is_pool[order],
            )
        jbda = {}
        if (
            name == "fmnist-id"
        ):  # the JBDA family's own queries (6.4k, against the undefended victim)
            for attack in ("jbda", "jb-top3"):
                jbda[attack] = jbda_stream(
                    attack, scenario, victim, get_victim(scenario)[1], 0, 6400
                )
        out[name] = {}
        for rate in args.alarm_rates:
            defense = type(profile_defense)(
                profile_defense.params.model_copy(update={"alarm_rate": rate})
            )
            result: dict = {"tau": defense.params.tau, "alarm_alpha": defense.params.alarm_alpha}
            result["benign_test_streams"] = [
                run_stream(defense, victim, test.images[order], args.request)
                for order in benign_orders
            ]
            result["false_alarms"] = sum(b["alarmed_keys"] for b in result["benign_test_streams"])
            result["knockoff"] = {
                str(k): run_stream(defense, victim, knockoff, args.request if k == 1 else 1, k)
                for k in (1, 4, 16, 64, 256, 1024)
            }
            for label, (stream, counted) in diluted.items():
                result[label] = run_stream(defense, victim, stream, args.request, counted=counted)
            for attack, stream in jbda.items():
                result[attack] = run_stream(defense, victim, stream, args.request)
            out[name][str(rate)] = result
            print(
                name,
                rate,
                {k: v for k, v in result.items() if k != "benign_test_streams"},
                flush=True,
            )
    write_json(args.json, out, args)


if __name__ == "__main__":
    main()
