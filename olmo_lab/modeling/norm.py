"""RMSNorm as OLMo 2/3 and FlexOlmo use it: normalise in fp32, multiply by the gain in fp32, cast back.

This differs from Llama's RMSNorm, which casts back to the input dtype *before* the gain; in bf16
the two round differently. The gain is `weight` (initialised to 1), not `1 + weight`; no bias.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)  # bf16 weight is promoted: the product is fp32

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
