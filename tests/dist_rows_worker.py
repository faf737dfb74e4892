"""Run by ``torchrun --nproc_per_node=2`` from tests/test_distributed.py: each rank holds a different
row-sparse gradient (overlapping rows, different counts, one rank with none on the second table);
``distributed.sync_row_grads`` must leave the mean of the ranks' dense gradients on every rank."""
import os

import torch
import torch.distributed as dist

from glrec_fast import distributed

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ctx = distributed.Context(rank=rank, world_size=world, local_rank=rank, backend="gloo")


def grad_of(r):
    rows = [[1, 3, 3], [3, 5, 0, 2]][r]
    vals = torch.arange(len(rows) * 2, dtype=torch.float32).view(-1, 2) + 10 * r
    return torch.sparse_coo_tensor(torch.tensor([rows]), vals, (6, 2))


# a and b: the ranks' rows reach half the table (the dense all-reduce path); c: a few rows of a
# large table (the gather path)
a, b = torch.zeros(6, 2, requires_grad=True), torch.zeros(4, 2, requires_grad=True)
c = torch.zeros(100, 2, requires_grad=True)
a.grad = grad_of(rank)
b.grad = None if rank == 0 else torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 2), (4, 2))
c.grad = torch.sparse_coo_tensor(torch.tensor([[5, 90][:rank + 1]]), torch.full((rank + 1, 2), 1.0 + rank), (100, 2))
distributed.sync_row_grads([a, b, c], ctx)
want_c = torch.zeros(100, 2)
want_c[5], want_c[90] = (1.0 + 2.0) / world, 2.0 / world
torch.testing.assert_close(c.grad.to_dense(), want_c, rtol=0, atol=0)
assert c.grad.is_sparse and a.grad.is_coalesced() and c.grad.is_coalesced()
assert a.grad._nnz() == 5 and c.grad._nnz() == 2   # exactly the rows some rank touched
want_a = sum(grad_of(r).to_dense() for r in range(world)) / world
want_b = torch.zeros(4, 2)
want_b[2] = 1 / world
assert a.grad.is_sparse and b.grad.is_sparse
torch.testing.assert_close(a.grad.to_dense(), want_a, rtol=0, atol=0)
torch.testing.assert_close(b.grad.to_dense(), want_b, rtol=0, atol=0)
print(f"rank {rank} rows synced", flush=True)
dist.destroy_process_group()
