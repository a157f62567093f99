"""A SIGTERM that arrives before training's own handler is in place."""

from __future__ import annotations

import signal


class SigtermLatch:
    """Installed as the SIGTERM handler; remembers that one came.

    Importing torch and megatron-core takes seconds on a cluster's shared filesystem, before the
    trainer installs its handler. A job pre-empted meanwhile would die of the default action
    (exit 143, no checkpoint record, no re-queue); with the latch installed first, the trainer
    takes the signal over (:class:`megatron_ext.training.loop.StopRequest`) and stops cleanly.
    """

    def __init__(self) -> None:
        self.fired = False
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum: int, frame: object) -> None:
        """The handler: note the signal, carry on."""
        self.fired = True
