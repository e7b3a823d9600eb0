"""State of balancers whose randomness is a pure function of (seed, step): MAMG's and PCGrad's task
orders, RLW's weights. Every rank computing the draw gets the same one, and a resumed run draws what
the uninterrupted one would; `step` counts adopted steps (a skipped step draws again)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SeededSteps:
    """Mixin (list it before the Balancer base): the `seed` option, the adopted-step counter, and
    their checkpoint. Needs the class attribute `name` for its error messages."""

    seed: int = 0
    step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        check_seed(self.seed)

    def advance(self) -> None:
        """The next step draws anew; skipped steps do not advance (their call is discarded)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = getattr(self, "name", type(self).__name__)
        if set(state) != {"seed", "step"}:
            raise ValueError(f"{name} state must have keys seed, step; got {sorted(state)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"{name} state step must be an integer >= 0; got {step!r}")
        check_seed(state["seed"])
        self.seed, self.step = int(state["seed"]), int(step)


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"balancer.seed must be an integer >= 0; got {seed!r}")
