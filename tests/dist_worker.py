"""Run by ``torchrun`` from tests/test_distributed.py: ``glrec_fast.train.train`` on every rank with a
user callback that raises on one rank at one step (a rank failing mid-training, as a bug or a bad
batch would). Usage: ``torchrun ... dist_worker.py FAIL_RANK FAIL_STEP --key value ...``."""
import os
import sys

from glrec_fast import config
from glrec_fast.train import train


class FailOnRank:
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_start(self, **_):
        pass

    def on_step(self, step, **_):
        if int(os.environ["RANK"]) == self.rank and step == self.step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step}")

    def on_epoch_end(self, **_):
        pass

    def on_end(self, **_):
        return {}


if __name__ == "__main__":
    fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
    train(config.resolve(sys.argv[3:]), callbacks=[FailOnRank(fail_rank, fail_step)])
