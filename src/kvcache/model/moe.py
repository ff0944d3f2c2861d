"""DeepSeek's mixture-of-experts MLP: each token goes through ``experts_per_token`` routed experts (weighted)
plus the shared experts (always).

Routing, as transformers defines it:
* V3 (``sigmoid``): sigmoid scores; a correction bias is added for *choosing* only; experts are chosen from the
  ``topk_groups`` groups with the best sum of their two best biased scores; the chosen experts' unbiased
  scores are the weights, normalised to sum 1 if ``norm_topk_prob``, times ``routed_scaling_factor``.
* V2 (``softmax``): softmax scores; ``greedy`` takes the top-k, ``group_limited_greedy`` only from the
  ``topk_groups`` groups with the best single score; weights times ``routed_scaling_factor``.
The router runs in float32 whatever the model's dtype.  Experts' weights are stacked: one tensor per
projection, indexed by expert.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import activation
from .config import ModelConfig
from .linear import Linear


class SwiGLU(nn.Module):
    """down(act(gate) * up) (act: SiLU unless the config says otherwise), gate and up fused into one matmul (a
    dense layer, or the shared experts)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.act = activation(act)
        self.up = Linear(hidden, 2 * intermediate, bias=bias)
        self.down = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        m, H = config.moe, config.hidden_size
        self.moe, self.act = m, activation(config.hidden_act)
        self.router = nn.Parameter(torch.empty(m.num_experts, H, dtype=torch.float32))
        if m.scoring == "sigmoid":
            self.router_bias = nn.Parameter(torch.zeros(m.num_experts, dtype=torch.float32))
        self.experts_up = nn.Parameter(torch.empty(m.num_experts, 2 * m.intermediate_size, H))
        self.experts_down = nn.Parameter(torch.empty(m.num_experts, H, m.intermediate_size))
        shared = m.intermediate_size * m.shared_experts
        self.shared = SwiGLU(H, shared, act=config.hidden_act) if m.shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (tokens, k) in float32, expert indices (tokens, k)) for x (tokens, hidden)."""
        m = self.moe
        logits = F.linear(x.float(), self.router.float())
        if m.scoring == "sigmoid":
            scores = logits.sigmoid()
            choice = scores + self.router_bias.float()
            per_group = choice.view(-1, m.num_groups, m.num_experts // m.num_groups).topk(2, dim=-1)[0].sum(-1)
            choice = self._keep_groups(choice, per_group, float("-inf"))
            index = choice.topk(m.experts_per_token, dim=-1, sorted=False)[1]
            weights = scores.gather(1, index)
            if m.norm_topk_prob:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        else:
            scores = logits.softmax(dim=-1, dtype=torch.float32)
            if m.topk_method == "group_limited_greedy":
                per_group = scores.view(-1, m.num_groups, m.num_experts // m.num_groups).amax(-1)
                scores = self._keep_groups(scores, per_group, 0.0)
            weights, index = scores.topk(m.experts_per_token, dim=-1, sorted=False)
        return weights * m.routed_scaling_factor, index

    def _keep_groups(self, scores: torch.Tensor, per_group: torch.Tensor, fill: float) -> torch.Tensor:
        """``scores`` with every expert outside the ``topk_groups`` best groups set to ``fill``."""
        m = self.moe
        best = per_group.topk(m.topk_groups, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.repeat_interleave(m.num_experts // m.num_groups, dim=1)
        return scores.masked_fill(~keep, fill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, index = self.route(tokens)
        out = torch.zeros_like(tokens)
        for expert in index.unique().tolist():  # only the experts some token chose
            rows, slot = (index == expert).nonzero(as_tuple=True)
            gate, up = F.linear(tokens[rows], self.experts_up[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.experts_down[expert])
            out.index_add_(0, rows, (y * weights[rows, slot, None]).to(out.dtype))
        out = out.view(shape)
        return out + self.shared(x) if self.shared is not None else out
