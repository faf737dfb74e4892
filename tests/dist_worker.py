"""Run by ``torchrun`` from tests/test_distributed.py: the ``python -m glrec_fast.train`` command line on
every rank, with one more callback that, on one rank at one step, raises (a rank failing mid-training, as a bug or a bad
batch would) or hangs (a rank stuck in a deadlock or on a dead disk).
Usage: ``torchrun ... dist_worker.py raise|hang FAIL_RANK FAIL_STEP --key value ...``."""
import os
import sys
import time

from glrec_fast import distributed, train


class FailOnRank:
    def __init__(self, how: str, rank: int, step: int):
        self.how, self.rank, self.step = how, rank, step

    def on_start(self, **_):
        pass

    def on_step(self, step, **_):
        if int(os.environ["RANK"]) == self.rank and step == self.step:
            if self.how == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")

    def on_epoch_end(self, **_):
        pass

    def on_end(self, **_):
        return {}


if __name__ == "__main__":
    how, fail_rank, fail_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if how not in ("raise", "hang"):
        raise SystemExit(f"dist_worker.py: expected raise or hang, got {how!r}")
    defaults = train.default_callbacks
    train.default_callbacks = lambda cfg: [*defaults(cfg), FailOnRank(how, fail_rank, fail_step)]
    from torch.distributed.elastic.multiprocessing.errors import record
    distributed.exit_rank(record(train.main)(sys.argv[4:]))   # what glrec_fast.train's __main__ does
