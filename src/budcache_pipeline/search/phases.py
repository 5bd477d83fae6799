"""The phases of one budget's search: start, anneal, confirm, climb; each resumes from the checkpoint.

`search_policy` builds a `SearchRun` and calls its phases in order. Every phase reads and
extends the checkpoint's chains (one per start), saves after each chunk of work and reports
where it is to the progress callback, so a run killed in any phase resumes where it stopped.
"""

from __future__ import annotations

import random
from typing import Any

from budcache_pipeline.search.annealing import AnnealState, anneal_many, evaluate_many
from budcache_pipeline.search.config import SearchConfig
from budcache_pipeline.search.hill_climbing import ClimbState, climb_round
from budcache_pipeline.search.objective import MaskObjective, key_mask, mask_key
from budcache_pipeline.search.progress import ProgressCallback, SearchProgress
from budcache_pipeline.search.starts import start_mask

SA_CHUNK = 10
RACE_FROM = 0.1


class SearchRun:
    """One budget's search over the checkpoint's chains: the objectives, the cost meter and the progress callback.

    `config` is the search's, with its forced positions normalised (and no iterations when a
    single mask fits the budget).
    """

    def __init__(
        self,
        objective: MaskObjective,
        screen: MaskObjective | None,
        state: Any,
        meter: Any,
        config: SearchConfig,
        budget: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.objective, self.screen, self.state, self.meter = objective, screen, state, meter
        self.config, self.budget, self.progress = config, budget, progress
        self.sa_objective = screen or objective
        self.source = "screen" if screen is not None else "full"
        self.chains: list[dict[str, Any]] = state.data.setdefault("chains", [])

    def save(self, phase: str, iteration: int, best: float | None = None, start: str | None = None) -> None:
        """Checkpoint the chains, the memoised losses of budget-sized masks and the cost so far; report it."""
        budget = self.budget
        self.state.data["memo"] = {
            "full": {k: v for k, v in self.objective.memo().items() if k.count("1") == budget},
            "screen": {k: v for k, v in self.screen.memo().items() if k.count("1") == budget} if self.screen else {},
        }
        self.state.data["cost"] = self.meter.now()
        self.state.save()
        self.report(phase, iteration, best, start)

    def report(self, phase: str, iteration: int, best: float | None = None, start: str | None = None) -> None:
        """Tell the progress callback where the search is (raising from it stops the search here)."""
        if self.progress is None:
            return
        c = self.config
        done = sum(
            c.sa_iterations + c.hc_rounds if chain["status"] in ("retired", "done")
            else chain["sa"]["iteration"] + (chain.get("hc") or {}).get("round", 0)
            for chain in self.chains
        )
        total = len(self.chains) * (c.sa_iterations + c.hc_rounds)
        self.progress(SearchProgress(self.budget, phase, iteration, done, total, best, start))

    def start(self, names: dict[str, list[bool] | None], only: list[bool] | None) -> None:
        """Each start's initial mask and its losses on the full set and the annealing set (once per search)."""
        s = self.config
        if not self.chains:
            initial = {
                name: given if given is not None else only if only is not None
                else start_mask(name, self.objective, self.budget, s.forced, s.seed, s.dp_samples)
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
            self.save("start", 0, min(full_losses))

    def anneal(self) -> None:
        """All running starts anneal in lockstep, chunk by chunk; starts far behind the leader retire."""
        s = self.config
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
            self.save("sa", stop, min(c["sa"]["best_loss"] for c in running))

    def _record(self, chain: dict[str, Any], row: dict[str, Any]) -> None:
        chain["history"].append({"iteration": row["iteration"], "phase": "sa", "start": chain["start"],
                                 "objective": self.source, "temperature": row["temperature"],
                                 "current_loss": row["current_loss"], "best_loss": row["best_loss"]})

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
                rng = random.Random(f"{self.config.seed}:{chain['start']}:hc")
                chain["hc"] = ClimbState.begin(key_mask(begin), begin_loss, rng).to_dict()
        self.save("hc", 0, min(c["sa_loss"] for c in self.chains))

    def climb(self) -> None:
        """Hill climbing per start on the full set (neighbours ranked on the screening subset, the best confirmed)."""
        s = self.config
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
                self.save("hc", state.round, state.current_loss, chain["start"])
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
