"""Bit allocation: one measured option per module so the decoder fits a bits-per-weight budget.

A pure function of the measurement (no torch, no model).  The problem is a multiple-choice knapsack:

    slots   one per module (each decoder layer's attention and MLP), with options o = (cost_o, err_o),
            cost = total_bits of the combination; err = the entry's ``token_err`` when every entry of
            the module has one (our measurements: mean per-token relative output error, see
            measure/measure.py token_error), else 1 - accuracy (ExLlamaV2's files, docs/pipeline.md section 4)
    budget  int(numel * bpw), numel = sum of K x padded N over every attention and MLP linear layer
            (head and embeddings are outside the budget, as in ExLlamaV2)
    choose  one option per slot with  sum cost <= budget  minimising  E_p = sum err ** p

ExLlamaV2 attacks this with randomised simulated annealing for a sweep of norms p and keeps the norm whose
solution has the smallest *maximum* per-module error.  We keep that outer criterion but solve each inner
problem by dynamic programming, so the result is deterministic and, for every norm, no worse than any
feasible solution on the same cost grid:

* costs are rounded **up** to a grid unit (1 bit when the budget is small enough, else budget / cells), so
  every grid-feasible choice is truly feasible; the DP is exact on that grid;
* the rounding leaves at most ``slots x unit`` bits unused (under 0.1 % of the budget with the default
  200,000 cells); an exact greedy top-up then spends what it can on real costs, taking the single-slot
  change with the largest decrease of E_p while the true total stays within budget.

Ties are broken by the lowest option index, so the same measurement always gives the same strategy.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from exl2.core.errors import UserError

DEFAULT_NORMS = tuple(1.5 + 0.25 * i for i in range(9))   # 1.5 .. 3.5, ExLlamaV2's sweep range
DEFAULT_CELLS = 200_000


class BudgetError(UserError, ValueError):
    """The target bits per weight cannot be met by any combination of the measured options."""


@dataclass(frozen=True)
class Slot:
    key: str                      # e.g. "model.layers.3.self_attn"
    costs: tuple[int, ...]        # total bits per option
    errs: tuple[float, ...]       # 1 - accuracy per option


@dataclass
class Solution:
    choice: dict[str, int]        # slot key -> option index
    bits: int                     # total bits of the chosen options
    budget: int
    norm: float
    energy: float                 # sum err ** norm
    max_err: float

    def bpw(self, numel: int) -> float:
        return self.bits / numel


def slots_from_measurement(measurement: dict) -> list[Slot]:
    """Slots from the ``measurement`` mapping of a measurement.json (``null`` entries are skipped)."""
    out = []
    for key, entries in measurement.items():
        if entries is None:
            continue
        if not entries:
            raise ValueError(f"measurement: module {key} has no options")
        costs = tuple(int(e["total_bits"]) for e in entries)
        if all("token_err" in e for e in entries):      # ours: per-token error (see measure.measure.token_error)
            raw = [float(e["token_err"]) for e in entries]
        else:                                           # ExLlamaV2's files: 1 - accuracy
            raw = [1.0 - float(e["accuracy"]) for e in entries]
        for i, r in enumerate(raw):
            # max(0, NaN) is 0: a NaN error would pass as a perfect option (measurement.load refuses it too)
            if not math.isfinite(r):
                raise ValueError(f"measurement: {key}[{i}] has a non-finite error ({r})")
        errs = tuple(max(0.0, r) for r in raw)
        out.append(Slot(key, costs, errs))
    if not out:
        raise ValueError("measurement: no measured modules")
    return out


def feasible_bits(slots: list[Slot]) -> tuple[int, int]:
    """Smallest and largest total bits any choice can have."""
    return sum(min(s.costs) for s in slots), sum(max(s.costs) for s in slots)


def solve(slots: list[Slot], budget: int, norm: float, cells: int = DEFAULT_CELLS) -> Solution:
    """Minimise ``sum err ** norm`` subject to ``sum cost <= budget`` (see the module docstring)."""
    lo, _ = feasible_bits(slots)
    if lo > budget:
        raise BudgetError(f"budget of {budget} bits is below the smallest possible total of {lo} bits")
    unit = max(1, math.ceil(budget / cells))
    cap = budget // unit                                   # grid capacity in units
    inf = float("inf")
    # best[c]: least energy of the slots so far with total grid cost <= c.  Start: no slots, energy 0.
    best = np.zeros(cap + 1)
    picks = []
    for s in slots:
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for o, (cost, err) in enumerate(zip(s.costs, s.errs)):
            w = -(-cost // unit)                           # round up: grid-feasible => truly feasible
            if w > cap:
                continue
            cand = best[: cap + 1 - w] + err ** norm       # totals w.. (below w this option does not fit)
            better = cand < new[w:]                        # strict: lower option index wins ties
            np.copyto(new[w:], cand, where=better)
            np.copyto(pick[w:], o, where=better)
        best = new
        picks.append(pick)
    if np.isfinite(best[cap]):
        choice = [0] * len(slots)
        c = cap
        for i in range(len(slots) - 1, -1, -1):
            o = int(picks[i][c])
            choice[i] = o
            c -= -(-slots[i].costs[o] // unit)
    else:
        # Only when the budget is within slots x unit bits of the cheapest total: the rounded-up costs
        # no longer fit, the true ones do.  Start from the cheapest choice and let the top-up work.
        choice = [min(range(len(s.costs)), key=lambda o: (s.costs[o], s.errs[o])) for s in slots]
    choice = _top_up(slots, choice, budget, norm)
    return _solution(slots, choice, budget, norm)


def _top_up(slots: list[Slot], choice: list[int], budget: int, norm: float) -> list[int]:
    """Spend bits left by the grid rounding: best single-slot improvement that still fits, repeatedly."""
    bits = sum(s.costs[o] for s, o in zip(slots, choice))
    while True:
        best_gain, best_move = 0.0, None
        for i, s in enumerate(slots):
            cur = choice[i]
            for o in range(len(s.costs)):
                if bits - s.costs[cur] + s.costs[o] > budget:
                    continue
                gain = s.errs[cur] ** norm - s.errs[o] ** norm
                if gain > best_gain:
                    best_gain, best_move = gain, (i, o)
        if best_move is None:
            return choice
        i, o = best_move
        bits += slots[i].costs[o] - slots[i].costs[choice[i]]
        choice[i] = o


def _solution(slots, choice, budget, norm) -> Solution:
    errs = [s.errs[o] for s, o in zip(slots, choice)]
    return Solution(
        choice={s.key: o for s, o in zip(slots, choice)},
        bits=sum(s.costs[o] for s, o in zip(slots, choice)),
        budget=budget,
        norm=norm,
        energy=sum(e ** norm for e in errs),
        max_err=max(errs),
    )


def _cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def optimize(measurement: dict, numel: int, bpw: float, norms=DEFAULT_NORMS, cells: int = DEFAULT_CELLS) -> Solution:
    """Choose one option per module for a target ``bpw`` over ``numel`` decoder weights.

    For each norm the knapsack is solved exactly on the cost grid; the norm whose solution has the
    smallest maximum module error wins (ties: smaller sum of errors, then the earlier norm).
    Raises :class:`BudgetError` naming the feasible bpw range when the target is outside it.
    """
    slots = slots_from_measurement(measurement)
    budget = int(numel * bpw)
    lo, hi = feasible_bits(slots)
    if not lo <= budget <= hi:
        lo_bpw = math.ceil(lo / numel * 1000) / 1000       # printed bounds are themselves valid targets
        hi_bpw = math.floor(hi / numel * 1000) / 1000
        side = "below" if budget < lo else "above"
        raise BudgetError(f"target {bpw} bpw is {side} what the measured options allow: "
                          f"choose between {lo_bpw:.3f} and {hi_bpw:.3f} bpw")
    # The norms are independent problems and numpy releases the GIL inside its array operations, so they run on
    # the machine's CPUs side by side (4.6 -> 2.6 s for SmolLM2's 60 modules on two cores); the choice below
    # takes them in the order given, as a loop would.
    with ThreadPoolExecutor(max_workers=max(1, min(len(norms), _cpus()))) as pool:
        sols = list(pool.map(lambda norm: solve(slots, budget, norm, cells), norms))
    best = None
    for sol in sols:
        key = (sol.max_err, sum(s.errs[sol.choice[s.key]] for s in slots))
        if best is None or key < best[0]:
            best = (key, sol)
    return best[1]
