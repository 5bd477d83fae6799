"""The phases of one budget's search: start, anneal, confirm, climb; each resumes from the checkpoint.

`search_policy` builds a `SearchRun` and calls its phases in order. Every phase reads and
extends the checkpoint's chains (one per start), saves after each chunk of work and reports
where it is through the callback, so a run killed in any phase resumes where it stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from budcache_pipeline.search.annealing import AnnealState, anneal_many, evaluate_many
from budcache_pipeline.search.hill_climbing import ClimbState, climb_round
from budcache_pipeline.search.objective import MaskObjective, key_mask, mask_key
from budcache_pipeline.search.starts import start_mask

SA_CHUNK = 10
RACE_FROM = 0.1


@dataclass(frozen=True)
class PhaseSettings:
    """The knobs the phases use (validated by `search_policy`)."""

    budget: int
    forced: tuple[int, ...]
    seed: int
    sa_iterations: int
    t_start: float
    t_end: float
    hc_rounds: int
    race_margin: float | None
    dp_samples: int
    hc_confirm: int
    hc_far_jumps: int


class SearchRun:
    """One budget's search over the checkpoint's chains: the objectives, the cost meter and the progress bar."""

    def __init__(
        self,
        objective: MaskObjective,
        screen: MaskObjective | None,
        state: Any,
        meter: Any,
        settings: PhaseSettings,
        bar: Any,
        callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.objective, self.screen, self.state, self.meter = objective, screen, state, meter
        self.settings, self.bar, self.callback = settings, bar, callback
        self.sa_objective = screen or objective
        self.source = "screen" if screen is not None else "full"
        self.chains: list[dict[str, Any]] = state.data.setdefault("chains", [])

    def save(self, where: dict[str, Any]) -> None:
        """Checkpoint the chains, the memoised losses of budget-sized masks and the cost so far."""
        budget = self.settings.budget
        self.state.data["memo"] = {
            "full": {k: v for k, v in self.objective.memo().items() if k.count("1") == budget},
            "screen": {k: v for k, v in self.screen.memo().items() if k.count("1") == budget} if self.screen else {},
        }
        self.state.data["cost"] = self.meter.now()
        self.state.save()
        if self.callback is not None:
            self.callback(where)

    def start(self, names: dict[str, list[bool] | None], only: list[bool] | None) -> None:
        """Each start's initial mask and its losses on the full set and the annealing set (once per search)."""
        s = self.settings
        if not self.chains:
            initial = {
                name: given if given is not None else only if only is not None
                else start_mask(name, self.objective, s.budget, s.forced, s.seed, s.dp_samples)
                for name, given in names.items()
            }
            full_losses = self.objective.evaluate_many(list(initial.values()))
            sa_losses = evaluate_many(self.sa_objective, list(initial.values()))
            for (name, mask), full_loss, sa_loss in zip(initial.items(), full_losses, sa_losses):
                self.chains.append({
                    "start": name,
                    "initial": mask_key(mask),
                    "initial_loss": full_loss,
                    "status": "sa",
                    "retired_at": None,
                    "sa": AnnealState.begin(mask, sa_loss, random.Random(f"{s.seed}:{name}:sa")).to_dict(),
                    "history": [],
                })
            self.save({"phase": "start", "iteration": 0})
        self.bar.update(sum(
            s.sa_iterations + s.hc_rounds if c["status"] in ("retired", "done")
            else c["sa"]["iteration"] + (c.get("hc") or {}).get("round", 0)
            for c in self.chains
        ))

    def anneal(self) -> None:
        """All running starts anneal in lockstep, chunk by chunk; starts far behind the leader retire."""
        s = self.settings
        while True:
            running = [c for c in self.chains if c["status"] == "sa" and c["sa"]["iteration"] < s.sa_iterations]
            if not running:
                return
            stop = min(running[0]["sa"]["iteration"] + SA_CHUNK, s.sa_iterations)
            states = anneal_many(
                self.sa_objective, [AnnealState.from_dict(c["sa"]) for c in running], s.forced, s.sa_iterations,
                s.t_start, s.t_end, stop, lambda index, row: self._record(running[index], row),
            )
            for chain, new in zip(running, states):
                chain["sa"] = new.to_dict()
            if s.race_margin is not None and s.sa_iterations * RACE_FROM <= stop < s.sa_iterations:
                leader = min(c["sa"]["best_loss"] for c in running)
                for chain in running:
                    if chain["sa"]["best_loss"] > leader * (1 + s.race_margin):
                        chain["status"], chain["retired_at"] = "retired", stop
                        self.bar.update(s.sa_iterations - stop + s.hc_rounds)
            self.bar.set_postfix(best=f"{min(c['sa']['best_loss'] for c in running):.4g}")
            self.save({"phase": "sa", "iteration": stop})

    def _record(self, chain: dict[str, Any], row: dict[str, Any]) -> None:
        chain["history"].append({"iteration": row["iteration"], "phase": "sa", "start": chain["start"],
                                 "objective": self.source, "temperature": row["temperature"],
                                 "current_loss": row["current_loss"], "best_loss": row["best_loss"]})
        self.bar.update(1)

    def confirm(self) -> None:
        """Each start's annealed best on the full set; a start that annealed worse climbs from its initial mask."""
        pending = [c for c in self.chains if "sa_loss" not in c]
        if not pending:
            return
        bests = [key_mask(c["sa"]["best"]) for c in pending]
        for chain, loss in zip(pending, self.objective.evaluate_many(bests)):
            chain["sa_loss"] = loss
            if chain["status"] == "sa":
                begin, begin_loss = (chain["sa"]["best"], loss) if loss <= chain["initial_loss"] else (
                    chain["initial"], chain["initial_loss"])
                chain["status"] = "hc"
                rng = random.Random(f"{self.settings.seed}:{chain['start']}:hc")
                chain["hc"] = ClimbState.begin(key_mask(begin), begin_loss, rng).to_dict()
        self.save({"phase": "hc", "iteration": 0})

    def climb(self) -> None:
        """Hill climbing per start on the full set (neighbours ranked on the screening subset, the best confirmed)."""
        s = self.settings
        for chain in self.chains:
            if chain["status"] != "hc":
                continue
            state = ClimbState.from_dict(chain["hc"])
            while not state.done and state.round < s.hc_rounds:
                state = climb_round(self.objective, state, s.forced, self.screen, s.hc_confirm, far_jumps=s.hc_far_jumps)
                chain["history"].append({"iteration": s.sa_iterations + state.round - 1, "phase": "hc",
                                         "start": chain["start"], "objective": "full", "temperature": None,
                                         "current_loss": state.current_loss, "best_loss": state.current_loss})
                chain["hc"] = state.to_dict()
                self.bar.update(1)
                self.bar.set_postfix(start=chain["start"], best=f"{state.current_loss:.4g}")
                self.save({"start": chain["start"], "phase": "hc", "iteration": state.round})
            self.bar.update(s.hc_rounds - state.round)
            chain["status"] = "done"

    def outcomes(self) -> list[dict[str, Any]]:
        """Each start's losses and masks: after climbing, or its annealed best when it was retired."""
        found = []
        for chain in self.chains:
            finished = chain.get("hc")
            mask, loss = (finished["current"], finished["current_loss"]) if finished else (
                chain["sa"]["best"], chain["sa_loss"])
            found.append({
                "start": chain["start"],
                "initial_loss": chain["initial_loss"],
                "sa_loss": chain["sa_loss"],
                "final_loss": loss,
                "mask": key_mask(mask),
                "initial_mask": key_mask(chain["initial"]),
                "retired_at": chain["retired_at"],
                "hc_rounds": finished["round"] if finished else 0,
            })
        return found

    def history(self) -> list[dict[str, Any]]:
        return [row for chain in self.chains for row in chain["history"]]
