"""The training loss: next-token cross-entropy with the output projection fused in.

The output layer is the widest matmul of a LLaMA model, and its (tokens, vocab) fp32
logits are the largest activation: 524 MB for 8 sequences of 512 tokens and a 32,000-piece
vocabulary, and as much again for their gradient. Materialising them, running log_softmax
over them and back again is memory-bound work that costs more than the attention of a small
model on a CPU. `fused_linear_cross_entropy` instead takes the final hidden states and the
output weight, and computes logits, loss and both gradients one block of rows at a time:
only one (rows, vocab) block exists at once, and it is reused in place for its gradient.
The gradients are computed in the forward pass (the loss is a scalar, so they only need
scaling by the incoming gradient in backward), the scheme of Liger Kernel's fused linear
cross-entropy (Hsu et al. 2024) and of Wijmans et al. 2024 ("Cut your losses").

Same result as `F.cross_entropy(hidden @ weight.T, targets)` up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamaworks.data.sft import IGNORE_INDEX

# Rows per block: 512 x 32,000 fp32 = 66 MB. Large enough that the three matmuls per block
# run at full speed (256 to 2048 rows measure the same on a 2-core CPU), small enough that the
# block buffers stay far below the full logits (8 x 512 tokens: 524 MB).
DEFAULT_CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int):
        # h: (n, d), weight: (vocab, d), targets: (n,); all gradients computed here.
        valid = targets != ignore_index
        n_valid = valid.sum()
        # Rows whose target is ignored (a fine-tuning prompt, padding) contribute no loss and no
        # gradient, so their logits are never computed: the rows with a target are gathered first
        # (an instruction's prompt is often half its tokens, and the output layer is the widest
        # matmul). All rows valid (pretraining): h itself, no copy.
        rows_kept = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # (n_valid,)
        hv = h if rows_kept is None else h.index_select(0, rows_kept)  # (n_valid, d)
        tv = targets if rows_kept is None else targets.index_select(0, rows_kept)
        n = hv.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hv = torch.empty_like(hv) if need_h else None
        # fp32 accumulator for the weight gradient whatever the compute dtype.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        # Two block buffers reused by every block: on CPU a fresh 100+ MB tensor per block costs
        # as many page faults as there are 4 KiB pages in it (about 0.1 s per GB).
        block = min(chunk_rows, n)
        logits_buf = torch.empty(block, weight.shape[0], dtype=h.dtype, device=h.device)
        logp_buf = torch.empty(block, weight.shape[0], dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            m = rows.stop - rows.start
            logits = torch.mm(hv[rows], weight.t(), out=logits_buf[:m])
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[:m])  # (rows, vocab)
            tgt = tv[rows].unsqueeze(1)
            loss_sum -= logp.gather(1, tgt).sum()
            if not (need_h or need_w):
                continue
            # d(loss_sum)/d(logits) = softmax - one_hot(target), built in place in the block.
            grad_logits = logp.exp_()
            grad_logits.scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=grad_logits.dtype))
            grad_logits = grad_logits.to(h.dtype)  # no copy in fp32
            if need_h:
                torch.mm(grad_logits, weight, out=grad_hv[rows])
            if need_w:
                if grad_w.dtype == grad_logits.dtype:
                    grad_w.addmm_(grad_logits.T, hv[rows])
                else:
                    grad_w += (grad_logits.T @ hv[rows]).float()
        grad_h = grad_hv
        if need_h and rows_kept is not None:  # zero for the ignored rows
            grad_h = torch.zeros_like(h).index_copy_(0, rows_kept, grad_hv)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.dtypes = h.dtype, weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        dh = (grad_h * scale).to(ctx.dtypes[0]) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.dtypes[1]) if grad_w is not None else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets`, never holding all the logits.

    h: (..., d) hidden states; weight: (vocab, d); targets: (...) class indices, entries equal
    to ignore_index count neither in the loss nor in the mean (as in F.cross_entropy).
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)  # differentiable casts, outside the Function
    elif weight.dtype != h.dtype:
        weight = weight.to(h.dtype)
    if not torch.is_grad_enabled():
        h, weight = h.detach(), weight.detach()  # evaluation: the loss alone, no gradient work
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows)


def can_fuse(model) -> bool:
    """Whether the fused loss may read model.output.weight directly.

    Not with sharded parameters (FSDP2, tensor parallelism): there the output layer's weight
    is only gathered by the module's own hooks, so those runs keep the logits path.
    """
    if not torch.distributed.is_available():
        return True
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return not isinstance(model, FSDPModule) and not isinstance(model.output.weight, DTensor)


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def lm_loss(model, tokens: torch.Tensor, targets: torch.Tensor, fused: bool = True,
            doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss of a llamaworks Transformer on (bsz, seq) tokens and targets: the mean over
    the targets that are not IGNORE_INDEX (fine-tuning masks prompts and padding with it).

    fused: the output projection and the cross-entropy run block by block
    (fused_linear_cross_entropy) where the model allows it (can_fuse); otherwise, the plain
    logits -> F.cross_entropy path.
    doc_ids: examples packed into rows (Transformer.forward's doc_ids), None for one sequence per row.
    """
    packed = {} if doc_ids is None else {"doc_ids": doc_ids}
    if not (fused and can_fuse(model)):
        logits = model(tokens, **packed)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), ignore_index=IGNORE_INDEX)
        # Logits split by vocabulary (tensor parallelism with loss parallel; the caller runs
        # forward and backward inside torch's loss_parallel()) give a replicated DTensor loss:
        # its local value is the loss, and full_tensor() keeps the graph without communicating.
        return loss.full_tensor() if _is_dtensor(loss) else loss
    h = model(tokens, return_hidden=True, **packed)  # (bsz, seq, dim), after the final RMSNorm
    return fused_linear_cross_entropy(h, model.output.weight, targets, ignore_index=IGNORE_INDEX)
