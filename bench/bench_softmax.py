"""The sampled softmax's forward + backward at the Gowalla recipe's shapes, side by side.

    pytest bench/bench_softmax.py --benchmark-only -q

Shapes of one MF d=256 step (batch 4,096 users and positives, 1,024 or 2,048 shared negatives,
temperature 0.1, with the learned item bias): the loss on the batch's vectors and the gradients of
every input. Providers: ``reference`` (reference.sampled_softmax: plain PyTorch as a careful user
writes it, one ``addmm`` with the offset folded in, an in-place mask, ``cross_entropy``) and ``ours``
(models.losses.sampled_softmax: one GEMM into one [B, N] buffer, exponentiated in place and reused
by the backward). Same inputs, same process; the rows carry ``median_ms``.
"""
import pytest
import torch

from glrec_fast import reference
from glrec_fast.models import losses

from conftest import DEVICES, record, run_pedantic

B, D, NUM_ITEMS = 4096, 256, 40981
PROVIDERS = {"reference": reference.sampled_softmax, "ours": losses.sampled_softmax}


def _inputs(n, device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, D, generator=g).to(device).requires_grad_()
    items = torch.randn(NUM_ITEMS, D, generator=g).to(device).requires_grad_()
    bias = torch.randn(NUM_ITEMS, generator=g).to(device).requires_grad_()
    pos = torch.randint(0, NUM_ITEMS, (B,), generator=g).to(device)
    neg = torch.randint(0, NUM_ITEMS, (n,), generator=g).to(device)
    return u, items, bias, pos, neg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("negatives", [1024, 2048])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_sampled_softmax_fwd_bwd(benchmark, provider, negatives, device):
    u, items, bias, pos, neg = _inputs(negatives, device)
    fn = PROVIDERS[provider]

    def step():
        p, n = items[pos], items[neg]
        loss = fn(u, p, n, pos, neg, 0.1, bias[pos], bias[neg])
        return torch.autograd.grad(loss, (u, items, bias))

    run_pedantic(benchmark, step, device, rounds=10, warmup=2)
    record(benchmark, negatives=negatives, batch=B, dim=D)
