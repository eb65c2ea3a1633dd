"""Imported once by the harness's fork server: load the backends and take the
first-call costs of the custom ops (imports, dispatch caches) there, so that
every forked case starts warm. Runs with one thread on tiny inputs, so no
OpenMP thread pool exists when the server forks (a fork of a process with a
live pool can deadlock)."""

import torch

import rcka_kernels as rk
from benchmarks import providers

_threads = torch.get_num_threads()
torch.set_num_threads(1)
try:
    providers.registry()  # loads every backend module
    _x = torch.randn(6, 3, requires_grad=True)
    _y = torch.randn(6, 2, requires_grad=True)
    (rk.cka_loss(_x, _y) + rk.cka_loss(_x, _y, kernel="rbf") + rk.cka_loss(_x, _y, debiased=True)
     + rk.gram_discrepancy(_x, _y, centered=False) + rk.mmd(_x, _y[:, :1].expand(6, 3).contiguous())).backward()
finally:
    torch.set_num_threads(_threads)
