"""Ctrl-C during training: the step in progress finishes, is saved as a checkpoint, and the run stops with one line
saying how to resume it. A second Ctrl-C stops at once, saving nothing more.

Why the first Ctrl-C waits for the step to end rather than stopping where it lands: a step changes the weights, the
optimiser, the LR schedule, the trainer's state (its random generator, DDPO's per-prompt statistics, DPOK's replay
buffer) and the RNGs piece by piece, so a checkpoint taken mid-step would hold a mix of two steps, and resuming from
it would not continue the run exactly. Copying all of that at every step, to roll a half-done step back, would cost
memory and time on every step (three copies of the denoiser for a full fine-tune) for the sake of a rare event; a
step is seconds to a few minutes, so waiting for its end is the cheaper exact answer.

Only a single-process run defers Ctrl-C. Under ``accelerate launch`` the launcher forwards the interrupt to every
process and then terminates them itself, so the processes could not agree on a step to save; there Ctrl-C stops the
run at once, and ``--resume`` continues from the last periodic checkpoint (``log.checkpoint_every``).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from tqdm.auto import tqdm


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C. ``checkpoint`` is the newest complete checkpoint (None if there is none);
    ``saved`` says whether it was written for this interrupt, i.e. holds every step trained."""

    def __init__(self, output_dir: Path, checkpoint: Path | None, *, saved: bool, step_in_progress: int):
        super().__init__()
        self.output_dir, self.checkpoint, self.saved = Path(output_dir), checkpoint, saved
        self.step_in_progress = step_in_progress

    @property
    def summary(self) -> str:
        if self.saved:
            return f"interrupted: saved {self.checkpoint}"
        stopped = f"stopped before step {self.step_in_progress} was saved"
        if self.checkpoint is None:
            return f"{stopped}; no checkpoint was written yet, so resuming starts the run over"
        return f"{stopped}; the last checkpoint is {self.checkpoint}"

    def __str__(self) -> str:
        return f"{self.summary}; continue with train(config, {str(self.output_dir)!r}, resume=True)"


class StopRequests:
    """A SIGINT handler for the duration of the loop: the first Ctrl-C sets ``requested`` and says what will happen,
    the second raises KeyboardInterrupt wherever the program is. ``step`` is the step in progress, for the message.
    Signal handlers can only be set from the main thread; elsewhere (and when not enabled) Ctrl-C keeps Python's
    default, an immediate KeyboardInterrupt. A process that ignores SIGINT (started in the background by a shell,
    or under nohup) keeps ignoring it."""

    def __init__(self, enabled: bool = True):
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        self.requested, self.step = False, 0
        self._previous = None

    def __enter__(self) -> StopRequests:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.enabled:   # None: the previous handler was not set from Python; Python's own is the closest
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"diffrl: Ctrl-C: finishing step {self.step} and saving it; press Ctrl-C again to stop at once "
                   "without saving it", file=sys.stderr)
