"""`eval --adapter`: an unmerged LoRA adapter scores as the merged model does."""

from __future__ import annotations

import pytest
import torch

from llamaworks.cli import main
from llamaworks.eval.lm import EvalModel
from llamaworks.inference.load import load_model
from llamaworks.inference.lora import LoraConfig, apply_lora, lora_parameters, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    model, _ = load_model(tiny_model_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):  # a trained-looking adapter: B is no longer zero
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, LoraConfig(r=4, alpha=8), root / "adapter", base_model=str(tiny_model_dir))
    assert main(["merge", "--checkpoint", str(tiny_model_dir), "--adapter", str(root / "adapter"),
                 "--out", str(root / "merged")]) == 0
    return root / "adapter", root / "merged"


def test_eval_with_an_adapter_scores_like_the_merged_model(tiny_model_dir, adapted):
    adapter, merged = adapted
    requests = [("The king said", " nothing"), ("To be or not", " to be"), ("Once upon", " a time")]
    base = EvalModel.from_dir(tiny_model_dir, device="cpu").loglikelihood(requests)
    unmerged = EvalModel.from_dir(tiny_model_dir, device="cpu", adapter=str(adapter)).loglikelihood(requests)
    want = EvalModel.from_dir(merged, device="cpu").loglikelihood(requests)
    for (a, _), (b, _) in zip(unmerged, want):
        assert abs(a - b) < 1e-4
    assert max(abs(a - b) for (a, _), (b, _) in zip(unmerged, base)) > 1e-3  # the adapter changes the scores


def test_harness_with_an_adapter_asks_for_a_merge(tiny_model_dir, adapted, capsys):
    assert main(["eval", "--checkpoint", str(tiny_model_dir), "--harness", "lm-eval", "--tasks", "x",
                 "--adapter", str(adapted[0])]) == 2
    assert "merge the adapter first" in capsys.readouterr().err
