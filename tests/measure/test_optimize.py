"""The bit-allocation solver: exact on small instances, budget held, monotone, deterministic."""
from __future__ import annotations

import itertools
import random

import pytest

from exl2.measure.optimize import BudgetError, Slot, feasible_bits, optimize, slots_from_measurement, solve


def random_slots(rng: random.Random, n_slots: int, n_opts: int, scale: int = 100) -> list[Slot]:
    """Options with costs rising and errors falling, plus noise, like a real measurement."""
    slots = []
    for i in range(n_slots):
        base = rng.randint(scale, 3 * scale)
        costs = sorted(int(base * (2 + 6 * j / (n_opts - 1)) * rng.uniform(0.9, 1.1)) for j in range(n_opts))
        errs = sorted((rng.uniform(0.001, 0.2) * 2 ** (-0.6 * j) for j in range(n_opts)), reverse=True)
        slots.append(Slot(f"model.layers.{i // 2}.{'self_attn' if i % 2 == 0 else 'mlp'}", tuple(costs), tuple(errs)))
    return slots


def brute_force(slots, budget, norm):
    best = None
    for combo in itertools.product(*(range(len(s.costs)) for s in slots)):
        if sum(s.costs[o] for s, o in zip(slots, combo)) > budget:
            continue
        e = sum(s.errs[o] ** norm for s, o in zip(slots, combo))
        if best is None or e < best:
            best = e
    return best


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    slots = random_slots(rng, n_slots=4, n_opts=5)
    lo, hi = feasible_bits(slots)
    budget = rng.randint(lo, hi)
    norm = rng.choice([1.0, 2.0, 3.5])
    sol = solve(slots, budget, norm)
    assert sol.bits <= budget
    assert sol.energy == pytest.approx(brute_force(slots, budget, norm), rel=1e-12)


def test_coarse_grid_stays_within_budget_and_near_optimal():
    # Force a grid unit much larger than one bit: the result must still fit, and the top-up must
    # bring it within a hair of the exact optimum.
    rng = random.Random(99)
    slots = random_slots(rng, n_slots=5, n_opts=4, scale=10_000)
    lo, hi = feasible_bits(slots)
    budget = (lo + hi) // 2
    coarse = solve(slots, budget, 2.0, cells=300)
    exact = brute_force(slots, budget, 2.0)
    assert coarse.bits <= budget
    assert coarse.energy <= exact * 1.25


def test_monotone_in_target():
    slots = random_slots(random.Random(5), n_slots=20, n_opts=8, scale=10_000)
    lo, hi = feasible_bits(slots)
    energies = [solve(slots, lo + (hi - lo) * i // 10, 2.0).energy for i in range(11)]
    assert all(a >= b for a, b in zip(energies, energies[1:])), energies


def test_deterministic_and_ties_take_lowest_index():
    slots = [Slot("a", (10, 10, 20), (0.5, 0.5, 0.1)), Slot("b", (10, 20), (0.3, 0.3))]
    sol = solve(slots, 30, 2.0)
    # a's best option (20 bits) plus b's cheaper one fills the 30 bits exactly; b's options have equal
    # error, so the lower index wins.
    assert sol.choice == {"a": 2, "b": 0}
    again = solve(slots, 30, 2.0)
    assert again.choice == sol.choice


def measurement_of(slots):
    m = {s.key: [{"accuracy": 1 - e, "total_bits": c} for c, e in zip(s.costs, s.errs)] for s in slots}
    m["model.norm.norm"] = None
    m["lm_head.linear"] = None
    return m


def test_optimize_hits_target_and_reports_range():
    slots = random_slots(random.Random(3), n_slots=12, n_opts=17, scale=100_000)
    numel = sum(s.costs[0] for s in slots) // 2          # the cheapest option is ~2 bpw
    m = measurement_of(slots)
    assert [s.key for s in slots_from_measurement(m)] == [s.key for s in slots]
    lo, hi = feasible_bits(slots)
    for bpw in (lo / numel, lo / numel + 0.01, 4.0, 5.5, hi / numel - 0.01, hi / numel):
        sol = optimize(m, numel, bpw)
        budget = int(numel * bpw)
        assert sol.bits <= budget
        # Nothing is left idle: no single module can move to a more accurate option within the bits left.
        for s in slots:
            cur = sol.choice[s.key]
            for o in range(len(s.costs)):
                if s.errs[o] < s.errs[cur]:
                    assert sol.bits - s.costs[cur] + s.costs[o] > budget
    with pytest.raises(BudgetError, match=r"below what the measured options allow: choose between \d\.\d{3} and \d\.\d{3} bpw"):
        optimize(m, numel, 1.0)
    with pytest.raises(BudgetError, match="above what the measured options allow"):
        optimize(m, numel, 12.0)


def test_norm_sweep_minimises_max_error():
    slots = random_slots(random.Random(8), n_slots=10, n_opts=10, scale=10_000)
    numel = sum(s.costs[0] for s in slots) // 2
    m = measurement_of(slots)
    sol = optimize(m, numel, 3.5)
    budget = int(numel * 3.5)
    for norm in (1.5, 2.5, 3.5):
        assert sol.max_err <= solve(slots, budget, norm).max_err + 1e-15


def test_token_err_preferred_over_accuracy_when_present():
    # Two modules, two options each; by 1 - accuracy module "a" looks insensitive, by token_err it is the
    # sensitive one.  With bits for one upgrade only, the upgrade must follow token_err.
    def e(acc, tok, bits):
        return {"accuracy": acc, "total_bits": bits, "token_err": tok}

    m = {"a": [e(0.99, 0.30, 10), e(0.995, 0.05, 20)], "b": [e(0.90, 0.10, 10), e(0.95, 0.08, 20)]}
    assert optimize(m, numel=10, bpw=3.0).choice == {"a": 1, "b": 0}
    # Without token_err (an ExLlamaV2 file) the same numbers give the other answer.
    for entries in m.values():
        for x in entries:
            del x["token_err"]
    assert optimize(m, numel=10, bpw=3.0).choice == {"a": 0, "b": 1}
