"""A policy stores the sigmas the transformer sees; pipelines must be handed the un-shifted inputs."""

from __future__ import annotations

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from budcache_pipeline.schedules import default_sigmas, scheduler_input_sigmas, shift_mu


@pytest.mark.parametrize(
    ("scheduler", "seq_len"),
    [
        (FlowMatchEulerDiscreteScheduler(shift=3.0), None),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 1024),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear"), 256),
    ],
)
def test_shift_inversion_round_trips_through_the_scheduler(scheduler, seq_len):
    target = [1.0, 0.9, 0.7, 0.4, 0.2, 0.05, 0.0]
    inputs = scheduler_input_sigmas(scheduler, target, seq_len)
    scheduler.set_timesteps(sigmas=inputs, mu=shift_mu(scheduler, seq_len))
    assert scheduler.sigmas.tolist() == pytest.approx(target, abs=1e-6)


def test_default_sigmas_are_shifted_and_end_at_zero():
    sigmas = default_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 28)
    assert len(sigmas) == 29 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert sigmas[14] > 1 - 14 / 28


def test_schedules_that_cannot_be_inverted_are_refused():
    with pytest.raises(ValueError, match="does not reproduce these sigmas"):
        scheduler_input_sigmas(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), [1.0, 0.5, 0.2, 0.0])
    with pytest.raises(ValueError, match="pass image_seq_len"):
        scheduler_input_sigmas(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="ending at 0"):
        scheduler_input_sigmas(FlowMatchEulerDiscreteScheduler(), [1.0, 0.5])
