"""AdamW under torchrun with its state sharded (ZeRO-2): each rank keeps the moments of its share
of every parameter's rows, updates only those rows, and the rows are then all-gathered.

Each parameter is cut along dim 0 into slices of k = ceil(rows / world) rows
(distributed.shard_bounds); one with fewer rows than ranks (a scalar gate) is not cut: every rank
keeps all of it and sums its gradient over ranks. A slice is a Parameter viewing the weight's own
rows, so torch's AdamW updates the weight in place. The gradients are reduce-scattered: a rank
receives the sum over ranks of its own rows only.

state_dict() gathers the slices' moments on rank 0 into the one-process layout (torch.optim.AdamW's
own), and load_state_dict() takes each rank's rows of it: a checkpoint is the same whatever the
number of processes that wrote it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed

MOMENTS = ("exp_avg", "exp_avg_sq")


class ShardedAdamW:
    def __init__(self, groups: list[dict], **kw):
        self.full = [p for g in groups for p in g["params"]]
        self.rows = [distributed.shard_bounds(len(p)) if p.dim() and len(p) >= distributed.world_size() else None
                     for p in self.full]  # (lo, hi, k) of a cut parameter, None for a whole one
        self.shards = [nn.Parameter(p.detach() if r is None else p.detach()[r[0]:r[1]])
                       for p, r in zip(self.full, self.rows)]
        shards = iter(self.shards)
        self.opt = torch.optim.AdamW([dict(g, params=[next(shards) for _ in g["params"]]) for g in groups], **kw)

    @property
    def param_groups(self) -> list[dict]:
        return self.opt.param_groups

    @property
    def state(self) -> dict:  # this rank's: its slices' moments
        return self.opt.state

    @torch.no_grad()
    def step(self) -> None:
        whole = []
        for p, s, r in zip(self.full, self.shards, self.rows):
            g = p.grad if p.grad is not None else torch.zeros_like(p)  # every rank sends the same layout
            if r is None:
                whole.append(g)
            else:
                s.grad = distributed.reduce_scatter_rows(g, r[2])[:r[1] - r[0]]
        distributed.all_reduce_(whole)
        for s, g in zip([s for s, r in zip(self.shards, self.rows) if r is None], whole):
            s.grad = g
        self.opt.step()
        gathers = [(p, distributed.all_gather_rows(distributed.pad_rows(s.detach(), r[2]), len(p)))
                   for p, s, r in zip(self.full, self.shards, self.rows) if r is not None]
        for p, gathered in gathers:
            p.copy_(gathered())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.full:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for s in self.shards:  # made anew from the weights' gradients at every step
            s.grad = None

    def state_dict(self) -> dict:
        """The one-process state on rank 0 (every rank must call it); {} on the others."""
        mine = self.opt.state_dict()
        for entry in mine["state"].values():
            for key in MOMENTS:
                entry[key] = entry[key].cpu()
        ranks = distributed.gather_objects(mine)
        if ranks is None:
            return {}
        full = ranks[0]
        for i, r in enumerate(self.rows):
            if r is not None and i in full["state"]:
                for key in MOMENTS:
                    full["state"][i][key] = torch.cat([rank["state"][i][key] for rank in ranks])
        return full

    def load_state_dict(self, state: dict) -> None:
        """Takes this rank's rows of a one-process state."""
        mine = {"param_groups": state["param_groups"], "state": {}}
        for i, entry in state["state"].items():
            r = self.rows[int(i)]
            mine["state"][i] = {k: v[r[0]:r[1]] if r is not None and k in MOMENTS else v for k, v in entry.items()}
        self.opt.load_state_dict(mine)
