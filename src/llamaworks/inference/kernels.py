"""CPU kernels for one-row (decode) products, and when the fused quantised kernels apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Above this many rows (prefill, large batches) a dequantised weight and a plain matmul beat
# the fused kernels, which are written for a few rows (measured on a 2-core AVX-512 machine).
KERNEL_MAX_ROWS = 32


def cpu_kernel(x: torch.Tensor, max_rows: int = KERNEL_MAX_ROWS) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= max_rows


class GemvLinear(nn.Linear):
    """nn.Linear whose one-row product (batch-1 decode) is torch.mv. With bf16 weights on CPU,
    F.linear of one row reads the weight at 20-22 GB/s where mv reads it at 25-27 GB/s
    (2-core AVX-512/AMX Xeon, weights 2048..32000 x 2048; fp32 and fp16 gain nothing: 29 vs 29,
    and 10.6 vs 8.7 GB/s), which is 1.2x more decode tokens/s for a 1.26B model in bf16.
    Same parameters and state-dict keys as nn.Linear; more rows take F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and self.bias is None:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> int:
    """Turn the bf16 CPU nn.Linear layers of `model` into GemvLinear in place (no copy: the
    class changes, the parameters stay); returns how many. DTensor (sharded) weights and
    other dtypes are left alone."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is nn.Linear and type(w) is nn.Parameter and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            m.__class__ = GemvLinear
            n += 1
    return n
