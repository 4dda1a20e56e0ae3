from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llamaworks.model import ModelArgs, build_model
from llamaworks.parallel.parallelize import ParallelDims, apply_ac, parallelize
from llamaworks.train.init import init_weights, parameter_seed

N_LAYERS = 2
MODES = ("none", "full", "selective")


@pytest.fixture(scope="module")
def base_model():
    return build_model(ModelArgs.from_name("tiny", n_layers=N_LAYERS, vocab_size=512), seed=0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 32), generator=g), torch.randint(0, 512, (2, 32), generator=g)


class KeptActivations(TorchDispatchMode):
    """Records each storage an op allocates during forward (with the op that made it). Those
    still alive once forward returns are what autograd, or a checkpoint policy's cache,
    keeps for backward: the activation memory that checkpointing is there to cut."""

    def __init__(self, preexisting):
        super().__init__()
        self.seen = {StorageWeakRef(t.untyped_storage()): None for t in preexisting}
        self.made: dict[StorageWeakRef, tuple[int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.seen and ref not in self.made:  # a view's storage is its base's
                    self.made[ref] = (t.untyped_storage().nbytes(), func.overloadpacket.__name__)
        return out

    def alive(self) -> tuple[int, Counter]:
        kept = [v for ref, v in self.made.items() if not ref.expired()]
        # Attention's op name depends on the device and backend (flash, efficient, cudnn...).
        ops = Counter("attention" if op.startswith("_scaled_dot_product") else op for _, op in kept)
        return sum(n for n, _ in kept), ops


def run(model, batch, mode: str):
    model = copy.deepcopy(model)
    apply_ac(model, mode)
    x, y = batch
    tracker = KeptActivations([*model.parameters(), *model.buffers(), x, y])
    with tracker:
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    kept = tracker.alive()
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, kept


def test_policies_give_the_same_loss_and_gradients(base_model, batch):
    ref_loss, ref_grads, _ = run(base_model, batch, "none")
    for mode in ("full", "selective"):
        loss, grads, _ = run(base_model, batch, mode)
        # Recomputation replays the same fp32 kernels on the same inputs.
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-7, msg=f"{mode}: {k}")


def test_selective_keeps_matmul_outputs_and_saves_memory(base_model, batch):
    kept = {mode: run(base_model, batch, mode)[2] for mode in MODES}
    (none_b, none_ops), (full_b, full_ops), (sel_b, sel_ops) = kept["none"], kept["full"], kept["selective"]
    # full keeps each block's input only, selective adds the expensive outputs, none keeps all.
    assert full_b < sel_b < none_b, {m: b for m, (b, _) in kept.items()}
    # Section 2.4: the outputs of the linear layers are saved (wq wk wv wo w1 w2 w3 per block),
    # and so is attention; the cheap element-wise ops (SiLU here) are recomputed.
    assert sel_ops["mm"] - full_ops["mm"] == 7 * N_LAYERS, (sel_ops, full_ops)
    assert sel_ops["attention"] >= N_LAYERS and full_ops["attention"] == 0, (sel_ops, full_ops)
    assert none_ops["silu"] == N_LAYERS and sel_ops["silu"] == 0 and full_ops["silu"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_keys_stay_metas(base_model, mode):
    model = copy.deepcopy(base_model)
    keys = list(model.state_dict())
    apply_ac(model, mode)
    assert list(model.state_dict()) == keys
    assert "layers.0.attention.wq.weight" in keys and "layers.1.feed_forward.w2.weight" in keys
    model.load_state_dict(base_model.state_dict(), strict=True)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_lora_gradients_are_the_same_under_every_policy(base_model, batch, quant):
    # Selective AC keeps the mm outputs and hands those same tensors back when a block is recomputed:
    # code that changes such an output in place (a quantised base's output plus the low-rank update,
    # once written as y.add_(low)) would add twice in the recompute. Every policy must give no-AC's grads.
    from llamaworks.inference.lora import LoraConfig, apply_lora
    from llamaworks.inference.quant import quantize_model

    grads = {}
    for mode in MODES:
        model = copy.deepcopy(base_model)
        if quant:
            quantize_model(model, quant, group_size=32)
            for m in model.modules():
                if hasattr(m, "decode_layouts"):  # as training builds it: no decode kernels' layouts
                    m.decode_layouts = False
                    m.refresh()
        apply_lora(model, LoraConfig(r=4, alpha=8))
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)  # B starts at zero: a nonzero update is what the recompute must repeat
        apply_ac(model, mode)
        model.train()
        x, y = batch
        F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for mode in ("full", "selective"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=0, atol=1e-6,
                                       msg=lambda m, mode=mode, n=n: f"{mode} {n}: {m}")


def test_unknown_policy_is_rejected(base_model):
    with pytest.raises(ValueError, match="train.activation_checkpointing must be none, full or selective"):
        apply_ac(copy.deepcopy(base_model), "some")


def test_parallel_dims_resolve():
    assert ParallelDims.resolve(1, -1, 1, 1, n_heads=4).dp == 1
    assert ParallelDims.resolve(2, -1, 2, 8, n_heads=4) == ParallelDims(2, 2, 2, 8)
    with pytest.raises(ValueError, match="world size is 8"):
        ParallelDims.resolve(2, 3, 1, 8, n_heads=4)
    with pytest.raises(ValueError, match="parallel.tp=3 does not divide"):
        ParallelDims.resolve(1, 1, 3, 3, n_heads=4)
    with pytest.raises(ValueError, match="parallel.tp must be >= 1"):
        ParallelDims.resolve(1, -1, 0, 1, n_heads=4)


def test_parallelize_needs_a_mesh_for_distributed_degrees(base_model):
    with pytest.raises(ValueError, match="need a DeviceMesh"):
        parallelize(copy.deepcopy(base_model), ParallelDims(1, 2, 1, 2))
    with pytest.raises(ValueError, match="DDP .* cannot be combined with parallel.tp=2"):
        parallelize(copy.deepcopy(base_model), ParallelDims(2, 1, 2, 4), mesh=object())


def _initialised(seed: int, n_layers: int = N_LAYERS) -> dict[str, torch.Tensor]:
    model = build_model(ModelArgs.from_name("tiny", n_layers=n_layers, vocab_size=512), device="meta")
    model.to_empty(device="cpu")
    init_weights(model, seed, torch.device("cpu"))
    return dict(model.named_parameters())


def test_init_draws_each_parameter_from_its_own_generator():
    a = _initialised(3)
    name = "layers.1.attention.wq.weight"
    g = torch.Generator().manual_seed(parameter_seed(3, name))
    torch.testing.assert_close(a[name], torch.randn(128, 128, generator=g) * 0.02)
    # init_weights' scheme: residual projections scaled by 1/sqrt(2 n_layers), norms at 1
    assert a["layers.0.feed_forward.w2.weight"].std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert a["tok_embeddings.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(a["layers.1.ffn_norm.weight"], torch.ones(128))
    # A parameter's values depend on the seed and its name only, not on which other
    # parameters exist or were drawn before it: what lets every rank draw its own.
    deeper = _initialised(3, n_layers=3)
    for k in ("tok_embeddings.weight", "layers.1.attention.wq.weight", "output.weight"):
        assert torch.equal(a[k], deeper[k]), k
    assert not torch.equal(a[name], _initialised(4)[name])
    assert not torch.equal(a[name], a["layers.0.attention.wq.weight"])


def test_tensor_parallelism_keeps_tied_embeddings_one_tensor(tmp_path):
    """apply_tp (here on a 1-process mesh: the placements and hooks of any tp) leaves the output
    layer reading the embedding's DTensor, so both layers' gradients land in one tensor.
    tests/parallel/test_tied_tp.py runs tp=2 against one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from llamaworks.parallel.parallelize import apply_tp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(ModelArgs.from_name("tiny", n_layers=1, tie_word_embeddings=True), device="meta")
        apply_tp(model, init_device_mesh("cpu", (1,)))
        emb = model.tok_embeddings.weight
        assert isinstance(emb, DTensor) and emb.placements == (Shard(0),)
        assert model.output.weight is emb
        assert [n for n, _ in model.named_parameters()].count("tok_embeddings.weight") == 1
        assert "output.weight" not in dict(model.named_parameters())
        model.to_empty(device="cpu")  # re-ties what it materialises (Transformer._apply)
        assert model.output.weight is model.tok_embeddings.weight
    finally:
        dist.destroy_process_group()
