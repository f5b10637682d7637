"""Tell a step-aware controller (the search's) which sampling step each attention call is in.

ComfyUI's sampler does not announce steps to the model; the call's sigma does. A step begins
when the sigma enters the next interval of the schedule, so extra model evaluations of
second-order samplers (heun, dpm_2) between two schedule sigmas stay in their step.
"""

from __future__ import annotations

from typing import Any, Sequence


class StepTracker:
    """Controller proxy: calls ``controller.begin_step(sigma, step)`` once per step, then delegates.

    schedule: the sigmas the steps start at, descending (ComfyUI's sigmas without the final 0).
    """

    def __init__(self, controller: Any, schedule: Sequence[float]):
        if not schedule or any(a <= b for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"the step schedule must be non-empty and strictly descending, got {list(schedule)}")
        self.controller = controller
        self.schedule = [float(s) for s in schedule]
        self.step = -1

    def step_of(self, sigma: float) -> int:
        """Index of the last schedule sigma >= ``sigma`` (relative tolerance 1e-4); 0 above all."""
        step = 0
        for i, start in enumerate(self.schedule):
            if sigma <= start * (1 + 1e-4) + 1e-8:
                step = i
        return step

    def attention(self, q, k, v, *, layer: int, sigma: float, **kwargs: Any):
        step = self.step_of(sigma)
        if step != self.step:
            self.controller.begin_step(sigma, step)
            self.step = step
        return self.controller.attention(q, k, v, layer=layer, sigma=sigma, **kwargs)

    def __deepcopy__(self, memo: dict) -> "StepTracker":
        return self
