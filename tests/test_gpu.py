"""The GPU path, marked `gpu`: bf16 autocast training step, the flash SDPA kernel, torch.compile
of a block, an NCCL process group, an FSDP2 mixed-precision step, a profiled step's trace and
memory snapshot. benchmarks/gpu_check.py runs
these on a GPU; without one they skip, except under LLAMAWORKS_GPU_CHECK_DEVICE=cpu (the
script's --device cpu smoke mode), where each runs its CPU counterpart (gloo, the CPU flash
kernel, compile with the aot_eager backend) so that the script and these tests cannot rot.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import apply_fsdp, resolve_mp_dtypes
from llamaworks.train.init import init_weights
from llamaworks.train.loss import lm_loss

pytestmark = pytest.mark.gpu
ARGS = dict(dim=256, n_layers=2, n_heads=4, vocab_size=1024, max_seq_len=256)


@pytest.fixture(scope="module")
def device() -> torch.device:
    if os.environ.get("LLAMAWORKS_GPU_CHECK_DEVICE") == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (or LLAMAWORKS_GPU_CHECK_DEVICE=cpu: benchmarks/gpu_check.py --device cpu)")
    return torch.device("cuda")


def _model(device, **over):
    model = build_model(ModelArgs.from_name("tiny", **{**ARGS, **over}), device="meta")
    model.to_empty(device=device)
    init_weights(model, 0, device)
    return model


def _batch(device, bsz=2, seq=128):
    return torch.randint(0, ARGS["vocab_size"], (bsz, seq + 1), device=device,
                         generator=torch.Generator(device).manual_seed(0))


def test_bf16_autocast_forward_and_backward_track_fp32(device):
    model = _model(device)
    tokens = _batch(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    ref = lm_loss(model, x, y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = lm_loss(model, x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-2, (loss.item(), ref.item())
    for n, p in model.named_parameters():  # fp32 master weights and gradients
        assert p.grad.dtype == torch.float32
        cos = F.cosine_similarity(p.grad.flatten(), ref_grads[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())


def test_flash_sdpa_backend_is_selected(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(2, 4, 128, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), profile(activities=acts) as prof:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    names = {e.key for e in prof.key_averages()}
    flash = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"}
    assert names & flash, sorted(n for n in names if "attention" in n)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # and the model itself runs through it (model.py calls scaled_dot_product_attention)
    model = _model(device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast(device.type, dtype=torch.bfloat16):
        model(_batch(device)[:, :-1])


def test_compiled_block_matches_eager(device):
    from llamaworks.parallel.parallelize import apply_compile

    torch._dynamo.reset()
    model = _model(device)
    x = _batch(device)[:, :-1]
    eager = model(x)
    if device.type == "cpu":  # inductor's C++ compile takes minutes on a shared CPU; the graph capture is checked
        for block in model.layers:
            block.compile(backend="aot_eager")
    else:
        apply_compile(model)
    compiled = model(x)
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_group(device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL binds the group to one GPU: the current one, by index
    device_id = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else None
    dist.init_process_group(backend, rank=0, world_size=1, device_id=device_id)
    yield backend
    dist.destroy_process_group()


def test_single_process_group_all_reduce(device, one_process_group):
    assert dist.get_backend() == one_process_group
    t = torch.arange(4, device=device, dtype=torch.float32)
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    b = torch.ones(8, device=device, dtype=torch.bfloat16)
    dist.all_reduce(b)
    assert b.dtype == torch.bfloat16 and b.sum().item() == 8


def test_fsdp_mixed_precision_step(device, one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    model = build_model(ModelArgs.from_name("tiny", **ARGS), device="meta")
    # FSDP on a one-rank mesh, as the trainer applies it: the policy's casts and the fp32 shards are checked
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("dp_shard",))
    apply_fsdp(model, mesh, "default", *resolve_mp_dtypes("auto" if device.type == "cuda" else "bf16", "float32",
                                                          device.type))
    model.to_empty(device=device)
    init_weights(model, 0, device)
    seen = []
    model.layers[0].attention.wq.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = _batch(device)
    losses = []
    for _ in range(3):
        loss = lm_loss(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert seen[0] == (torch.bfloat16, torch.bfloat16), seen[0]  # computed in bf16
    for p in model.parameters():  # the optimizer's shards stay fp32
        assert isinstance(p, DTensor) and p.dtype == torch.float32
    assert losses[-1] < losses[0], losses


def test_profiled_steps_write_a_trace_and_a_memory_snapshot(device, tmp_path):
    """profile.steps on the device: the Chrome trace and the memory profile, and on CUDA the
    allocator snapshot (pytorch.org/memory_viz), which no CPU run writes."""
    import json
    import pickle

    from llamaworks.train.profiling import StepProfiler

    model = _model(device)
    tokens = _batch(device, seq=32)
    prof = StepProfiler(tmp_path, (2, 2), device)
    for n in (1, 2, 3):
        with prof.step(n):
            lm_loss(model, tokens[:, :-1], tokens[:, 1:]).backward()
    names = {e.get("name") for e in json.loads((tmp_path / "profile" / "trace_steps_2-2_rank0.json").read_text())
             ["traceEvents"]}
    assert "step 2" in names and not names & {"step 1", "step 3"}
    assert (tmp_path / "profile" / "memory_steps_2-2_rank0.txt").stat().st_size > 0
    snapshot = tmp_path / "profile" / "memory_snapshot_steps_2-2_rank0.pickle"
    assert snapshot.exists() == (device.type == "cuda")
    if device.type == "cuda":
        assert pickle.loads(snapshot.read_bytes())["segments"]  # the allocator's memory while profiling
