"""Divergence watchdog: skip optimizer steps whose loss or gradient norm is not finite, stop after too many.

One bad batch (an fp16 overflow, a pathological example) should not poison the adapter, so such a step is
skipped: no optimizer step, no schedule step, gradients dropped. Several in a row mean the weights themselves
have diverged; continuing would only write NaN checkpoints, so the run stops and the last good one is kept.
"""

from __future__ import annotations

import math
import sys

from qlora_kit.errors import TrainingDiverged


class Watchdog:
    def __init__(self, max_bad_steps: int, spike_factor: float) -> None:
        self.max_bad_steps, self.spike_factor = max_bad_steps, spike_factor
        self.bad_in_a_row = 0
        self.bad_total = 0
        self.average: float | None = None  # exponential moving average of good losses

    def step_is_good(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> bool:
        """Count a non-finite step (False: skip it) or record a finite one; raise after too many bad in a row."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_in_a_row += 1
            self.bad_total += 1
            print(f"warning: step {step}: loss {loss}, grad norm {grad_norm}; step skipped "
                  f"({self.bad_in_a_row} in a row, at most {self.max_bad_steps})", file=sys.stderr)
            if self.bad_in_a_row > self.max_bad_steps:
                kept = f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint was saved"
                raise TrainingDiverged(f"training diverged: {self.bad_in_a_row} steps in a row with a non-finite "
                                       f"loss or gradient norm (train.max_bad_steps: {self.max_bad_steps}); lower "
                                       f"train.lr or check the data{kept}")
            return False
        self.bad_in_a_row = 0
        if self.average is not None and self.spike_factor and loss > self.spike_factor * self.average:
            print(f"warning: step {step}: loss {loss:.4f} is {loss / self.average:.1f}x the running average "
                  f"{self.average:.4f}", file=sys.stderr)
        # 0.9: averages over roughly the last 10 steps, long enough to ignore noise, short enough to follow decay.
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
        return True
