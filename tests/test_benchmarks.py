"""The benchmark scripts keep running (issue 16): each one's smoke mode in a subprocess, and
benchmarks/machine.py, the one machine record they all write."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = ("decode", "gemv", "finetune", "train_throughput", "eval_throughput", "serve", "data_throughput",
           "train_distributed", "prefix_ttft")


def load_benchmark(name: str):
    """benchmarks/NAME.py as module `bench_NAME`. Scripts import their siblings (machine.py) from their folder,
    which is on sys.path only while this one loads: left there, benchmarks/serve.py would shadow tests/serve and
    a spawned worker would import the folder's scripts in place of installed packages."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def load_machine():
    return load_benchmark("machine")


def test_no_script_shadows_an_installed_module():
    # Running `python benchmarks/X.py` puts benchmarks/ first on sys.path, in the script and in every process it
    # spawns (Dask workers, torchrun): a script named like a package (distributed.py did) replaces that package.
    # Asked of a fresh interpreter: this one has tests/ on sys.path and benchmark modules already imported.
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    code = "import importlib.util, sys; print(*[n for n in sys.argv[1:] if importlib.util.find_spec(n)])"
    shadowing = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True,
                               cwd="/").stdout.split()
    assert shadowing == [], f"benchmarks/ scripts named like importable modules: {shadowing}; rename them"


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2
"""


def test_cpu_model_and_flags_reads_the_kernel_flags():
    model, flags = load_machine().cpu_model_and_flags(CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    # The first CPU's flags, the ones kernels choose by, every AMX flag; fpu is not one of them.
    assert flags == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"]
    assert load_machine().cpu_model_and_flags("flags : sse2 avx2\n")[1] == ["avx2"]


def test_auto_label_from_the_load_average():
    m = load_machine()
    assert m.auto_label([0.3, 0.2, 0.1], 2) == "quiet machine"
    assert m.auto_label([1.5, 0.2, 0.1], 2) == "contended"
    assert m.auto_label(None, 2) == "contended"  # unknown load never passes for quiet


def test_machine_record_fields():
    m = load_machine()
    rec = m.machine_record("quiet machine", bandwidth=False, threads=3, libraries=("pytest",))
    assert rec["label"] == "quiet machine" and rec["label_source"] == "given"
    assert rec["threads"] == 3 and rec["read_bandwidth"] is None
    assert rec["pytest"] == pytest.__version__
    for key in ("cpu_model", "cpu_flags", "logical_cpus", "torch", "transformers", "llama-cpp-python", "date"):
        assert key in rec
    auto = m.machine_record(bandwidth=12.5e9)
    assert auto["read_bandwidth"] == 12.5e9 and auto["label"] in ("contended", "quiet machine")
    assert auto["label_source"].startswith("derived")


def test_write_result_is_atomic_and_whole(tmp_path, monkeypatch):
    m = load_machine()
    out = tmp_path / "sub" / "r.json"
    m.write_result(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in out.parent.iterdir()] == ["r.json"]
    # A result that cannot be serialised leaves the previous file whole.
    with pytest.raises(TypeError):
        m.write_result(out, {"a": object()})
    assert json.loads(out.read_text()) == {"a": 1}


# The scripts a user runs (a __main__ block); modules they import (machine.py, engine_fixtures.py) are not timed.
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py")
                 if p.stem != "machine" and 'if __name__ == "__main__":' in p.read_text())


def test_the_script_list_finds_the_benchmarks():
    assert {"decode", "serve", "finetune", "data_throughput"} <= set(SCRIPTS)
    assert "machine" not in SCRIPTS and "engine_fixtures" not in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_takes_the_shared_machine_record(script):
    text = (BENCH / f"{script}.py").read_text()
    assert re.search(r"^from machine import .*(machine_record|record_in_child)", text, re.M), script
    assert "/proc/cpuinfo" not in text, f"{script}.py reads /proc/cpuinfo itself: use benchmarks/machine.py"


def run(script: str, *args: str, timeout: int = 1200) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.slow
def test_prefix_ttft_smoke(tmp_path):
    out = tmp_path / "prefix_ttft.json"
    run("prefix_ttft", "--preset", "tiny", "--smoke", "--out", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["tokens_identical"] and d["machine"]["label"] == "test"
    rows = {r["engine"]: r for r in d["rows"]}
    assert rows["paged, no prefix cache"]["prompt_tokens_prefilled"] == rows["paged, no prefix cache"]["prompt_tokens"]
    # The shared 64-token system prompt is prefilled once (in 16-token blocks), the rest per request.
    assert rows["paged + prefix cache"]["prompt_tokens_prefilled"] == 72 + 3 * 8


def test_serve_smoke(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    out = tmp_path / "serve.json"
    text = run("serve", "--smoke", "--output", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test"
    ours = d["results"][0]
    assert ours["server"] == "llamaworks"
    for wl in ("chat", "mixed"):
        assert ours[wl]["errors"] == 0 and ours[wl]["requests"] == 8
        # eos is biased away: every request generates exactly max_tokens
        assert ours[wl]["generated_tokens"] == 8 * d["max_tokens"]
        assert ours[wl]["ttft_p50_s"] > 0
    assert "llama-server side skipped" in text


def llama_tool(name: str):
    return load_benchmark("serve").find_llama_server(name)


@pytest.mark.slow
def test_serve_smoke_against_llama_server(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    if llama_tool("llama-server") is None:
        pytest.skip("llama-server not built (benchmarks/serve.py --build-llama-server)")
    out = tmp_path / "serve.json"
    run("serve", "--smoke", "--llama-server", "--output", str(out))
    d = json.loads(out.read_text())
    assert [r["server"] for r in d["results"]] == ["llamaworks", "llama-server f32"]
    theirs = d["results"][1]
    for wl in ("chat", "mixed"):
        assert theirs[wl]["errors"] == 0 and theirs[wl]["generated_tokens"] == 8 * d["max_tokens"]
        assert d["ratios_ours_over_llama_server"][wl]["tokens_per_s"] > 0


@pytest.mark.slow
def test_decode_llama_cpp_batched(tmp_path):
    pytest.importorskip("llama_cpp")
    if llama_tool("llama-batched-bench") is None:
        pytest.skip("llama-batched-bench not built (benchmarks/serve.py --build-llama-server)")
    out = tmp_path / "decode.json"
    run("decode", "--quick", "--batches", "2", "--impls", "llamaworks", "llama.cpp", "--precisions", "fp32",
        "--out", str(out))
    impls = {r["impl"] for r in json.loads(out.read_text())["results"]}
    assert "llama.cpp f32 batched-bench" in impls, impls


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "train.json"
    text = run("train_throughput", "--smoke", "--out", str(out))
    assert "first-step losses agree within 1e-4: True" in text
    assert json.loads(out.read_text())["machine"]["cpu_model"]


@pytest.mark.slow
def test_decode_quick(tmp_path):
    out = tmp_path / "decode.json"
    run("decode", "--quick", "--impls", "llamaworks", "transformers", "--precisions", "fp32", "int8", "--out", str(out))
    d = json.loads(out.read_text())
    assert {r["impl"] for r in d["results"]} >= {"llamaworks fp32", "llamaworks int8", "transformers fp32"}
    assert d["machine"]["read_bandwidth"] > 0


class FakeGroup:
    """A row group's worker for decode.time_variants: records the commands in `log`."""

    def __init__(self, group, log):
        self.group, self.log = group, log
        log.append(("open", group))

    def call(self, cmd, *args):
        self.log.append((cmd, *args))
        return {"bytes_per_step": 1, "weights_in_huge_pages": None} if cmd == "prepare" else (
            (0.5, [[len(self.log)]]) if cmd == "run" else None)

    def close(self):
        self.log.append(("close", self.group))


def decode_variants(decode):
    return [decode.Variant(label, "fp32", group, 1, batch1_only, None)
            for label, group, batch1_only in (("ours", "g1", False), ("ours+compile", "g1", False),
                                              ("theirs", "g2", True))]


def test_decode_process_isolation_runs_each_group_alone():
    decode = load_benchmark("decode")
    log = []
    a = argparse.Namespace(isolate="process", batches=[1, 8], repeats=2)
    out = decode.time_variants(decode_variants(decode), a, lambda g: FakeGroup(g, log))
    assert set(out) == {("ours", 1), ("ours", 8), ("ours+compile", 1), ("ours+compile", 8), ("theirs", 1)}
    assert all(len(times) == 2 for _, times, _ in out.values())
    # g1 is closed before g2 opens; a variant is dropped after its last batch size, before the next is built
    assert log.index(("close", "g1")) < log.index(("open", "g2"))
    assert log.index(("drop", "ours")) < log.index(("prepare", "ours+compile", 1))
    assert log.index(("run", "ours", 8)) < log.index(("drop", "ours"))


def test_decode_interleave_builds_everything_then_round_robins():
    decode = load_benchmark("decode")
    log = []
    a = argparse.Namespace(isolate="interleave", batches=[1], repeats=3)
    out = decode.time_variants(decode_variants(decode), a, lambda g: FakeGroup(g, log))
    cmds = [c for c in log if c[0] in ("prepare", "run")]
    assert [c[0] for c in cmds[:3]] == ["prepare"] * 3
    assert [c[1] for c in cmds[3:]] == ["ours", "ours+compile", "theirs"] * 3
    assert all(len(times) == 3 for _, times, _ in out.values())
    assert log[-2:] == [("close", "g1"), ("close", "g2")]


@pytest.mark.slow
def test_decode_isolated_rows_agree_with_in_process(tmp_path):
    # The workers rebuild the model from the seed (checked against the parent's weights): the same greedy tokens
    # as rows timed in the parent's process, in every isolation mode.
    tokens = {}
    for mode in ("none", "process", "interleave"):
        out = tmp_path / f"{mode}.json"
        run("decode", "--quick", "--impls", "llamaworks", "--precisions", "fp32", "int8", "--isolate", mode,
            "--out", str(out))
        d = json.loads(out.read_text())
        assert d["isolation"] == mode and {r["isolation"] for r in d["results"]} == {mode}
        tokens[mode] = [(r["impl"], r["same_tokens"]) for r in d["results"]]
        assert tokens[mode][0] == ("llamaworks fp32", 8)
    assert tokens["none"] == tokens["process"] == tokens["interleave"]


@pytest.mark.slow
def test_data_throughput_smoke(tmp_path):
    out = tmp_path / "data.json"
    text = run("data_throughput", "--smoke", "--json", str(out))
    d = json.loads(out.read_text())
    assert d["runs"]["ours_c4filter"]["kept"] > 0
    if "datatrove_c4filter_same_rules" in d["runs"]:  # datatrove installed (the bench extra)
        agree = d["kept_agreement"]["ours_c4filter~datatrove_c4filter_same_rules"]
        assert agree["jaccard"] >= 0.99, agree
        assert "ours_c4filter/datatrove_c4filter_same_rules" in d["ratio_docs_per_s"]
    else:
        assert "datatrove not installed" in text
    if "ours_minhash_dask@2" in d["runs"]:  # dask installed (the cluster extra): the partitioned dedup
        assert d["partitioned_keeps_the_single_process_documents"] == {"ours_minhash_dask@2": True}
        assert d["simulated_64_worker_layout"]["index_bytes_total"] > 0
    mix = d["mix"]
    assert mix["runs"]["mix_after"]["mb_per_s"] > 0 and 0 < mix["runs"]["mix_after"]["tokenising_share"] <= 1
    assert mix["tokenizer_alone"]["same_ids"] and mix["tokenizer_alone"]["word_cache_refusal"] is None


@pytest.mark.slow
def test_eval_throughput_small(tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "eval.json"
    run("eval_throughput", "--limit", "8", "--batch", "4", "--output", str(out))
    assert json.loads(out.read_text())["machine"]["threads"] == 2


@pytest.mark.slow
def test_distributed_tiny(tmp_path):
    out = tmp_path / "dist.json"
    run("train_distributed", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch", "4", "--seq-len", "16",
        "--pp-microbatches", "2", "--checkpoint-preset", "", "--out", str(out))
    d = json.loads(out.read_text())
    assert {r["strategy"] for r in d["rows"]} >= {"ddp", "fsdp", "fsdp_x_tp", "pp_x_fsdp"}
    assert d["machine"]["threads"] == 1
    for r in d["rows"][1:]:  # every strategy's volume is measured, by kind, near the computed one
        assert r["measured_comm_bytes_by_kind"].keys() >= r["comm_bytes_by_kind"].keys(), r
        for kind, computed in r["comm_bytes_by_kind"].items():
            assert 0.5 < r["measured_comm_bytes_by_kind"][kind] / computed < 2, (r["strategy"], kind, r)


@pytest.mark.slow
def test_gemv_quick():
    from llamaworks.inference import native

    if not native.load():
        pytest.skip("native kernels not built (python -m llamaworks.inference.native build)")
    run("gemv", "--quick", "--kinds", "fp32", "int8", "--rows", "1", "--repeats", "1", "--min-s", "0.02")


@pytest.mark.slow
def test_prompt_gemm_quick():
    # small and A's prompt products and prefills with both libraries (kernels.prompt_gemm); no JSON
    if not torch_has_onednn():
        pytest.skip("this torch has no oneDNN linear")
    out = run("prompt_gemm", "--quick", "--configs", "small", "--precisions", "fp32", "--min-s", "0.01")
    assert "prefill  small fp32" in out and "oneDNN" in out, out


def torch_has_onednn() -> bool:
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.mark.slow
def test_finetune_tiny(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "ft.json"
    run("finetune", "--configs", "A", "--precisions", "fp32", "--steps", "1", "--warmup", "0", "--batch", "1",
        "--seq-len", "32", "--qlora-configs", "--out", str(out))
    d = json.loads(out.read_text())
    assert d["complete"] and d["machine"]["cpu_model"]


def test_speculative_serve_smoke(tmp_path):
    out = tmp_path / "speculative_serve.json"
    run("speculative_serve", "--preset", "tiny", "--smoke", "--self-draft", "--out", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test"
    drafted = [r for r in d["rows"] if r["draft"]]
    assert len(drafted) == 4 and all(r["identical"] for r in drafted)  # greedy replies equal without the draft
    assert [r["acceptance_rate"] for r in drafted if r["draft"] == "the target itself"] == [1.0, 1.0]


def test_finetune_sequential_rounds_alternate_and_cancel_a_steady_drift():
    # Config B's two sides do not fit in memory together: they run in rounds of fresh processes,
    # llamaworks first, then peft first (ABBA), and the ratio is the geometric mean of the rounds'.
    ft = load_benchmark("finetune")
    assert ft.alternating_orders(["llamaworks", "peft"], 3) == [["llamaworks", "peft"], ["peft", "llamaworks"],
                                                               ["llamaworks", "peft"]]
    # A load that slows every run 20% more than the one before (1.0, 1.2, 1.44, 1.728), true ratio 1.5:
    # order L P | P L. Each round alone is off (1.8 and 1.25); their geometric mean is 1.5.
    lw = {"repeat_step_s": [1.0 * 1.0, 1.0 * 1.728], "tokens_per_s": 1.0}
    pf = {"repeat_step_s": [1.5 * 1.2, 1.5 * 1.44], "tokens_per_s": 1.0}
    assert abs(ft.repeat_ratio(lw, pf) - 1.5) < 1e-12
    # One round (side by side): the ratio of the medians' tokens/s.
    assert ft.repeat_ratio({"repeat_step_s": [2.0], "tokens_per_s": 3.0},
                           {"repeat_step_s": [1.0], "tokens_per_s": 2.0}) == 1.5


def test_finetune_depth_fit_extrapolates_to_the_full_depth():
    # --layers 2 4: each side's step time is fixed + per_block * depth; the full-depth ratio comes
    # from the fitted lines, not from the shallow runs' ratio, which the fixed part (embedding,
    # output layer, loss: cheaper on our side) inflates.
    ft = load_benchmark("finetune")
    fixed, block = ft.depth_fit([2, 4, 6], [1.0 + 2 * 3.0, 1.0 + 4 * 3.0, 1.0 + 6 * 3.0])
    assert fixed == pytest.approx(1.0) and block == pytest.approx(3.0)
    with pytest.raises(ValueError, match="distinct depths"):
        ft.depth_fit([2, 2], [1.0, 2.0])
    row = {"config": "B", "precision": "fp32", "ac": "none", "repeat_step_s": [0.0], "step_times": [],
           "first_loss": 1.0}
    results = []
    for n in (2, 4):  # ours: 1 s fixed + 3 s a block; peft's: 3 s fixed + 3.6 s a block
        results.append({**row, "impl": "llamaworks", "n_layers": n, "step_s": 1 + 3 * n, "peak_rss": 100 + 10 * n,
                        "tokens_per_s": 1 / (1 + 3 * n), "repeat_step_s": [1 + 3 * n]})
        results.append({**row, "impl": "peft", "n_layers": n, "step_s": 3 + 3.6 * n, "peak_rss": 100 + 20 * n,
                        "tokens_per_s": 1 / (3 + 3.6 * n), "repeat_step_s": [3 + 3.6 * n]})
    summary = ft.summarise(results, argparse.Namespace(ac="none"))
    assert summary["B fp32 2 layers"]["speedup_vs_peft"] == pytest.approx(10.2 / 7)  # shallow: 1.46x
    fit = summary["B fp32 at 22 layers, fitted from [2, 4]"]
    assert fit["speedup_vs_peft"] == pytest.approx((3 + 3.6 * 22) / (1 + 3 * 22))  # full depth: 1.23x
    assert fit["speedup_per_block"] == pytest.approx(1.2)
    assert fit["memory_vs_peft"] == pytest.approx(320 / 540) and fit["target_memory_no_more"]


def test_finetune_compares_each_allocator_variant_with_each_peft_side():
    # --impls llamaworks llamaworks-nokeep peft peft-keep: glibc keeping freed memory (train/heap.py) is a
    # process setting PEFT's process can have too, so ours is compared with PEFT with and without it.
    ft = load_benchmark("finetune")
    row = {"config": "B", "precision": "fp32", "ac": "none", "n_layers": 22, "first_loss": 1.0}
    step = {"llamaworks": 70.0, "llamaworks-nokeep": 80.0, "peft": 98.0, "peft-keep": 91.0}
    results = [{**row, "impl": impl, "step_s": s, "tokens_per_s": 1 / s, "repeat_step_s": [s], "peak_rss": 10 + s}
               for impl, s in step.items()]
    summary = ft.summarise(results, argparse.Namespace(ac="none"))
    assert summary["B fp32"]["speedup_vs_peft"] == pytest.approx(98 / 70)  # the key quoted so far
    assert summary["B fp32 llamaworks vs peft-keep"]["speedup_vs_peft"] == pytest.approx(91 / 70)
    assert summary["B fp32 llamaworks-nokeep vs peft"]["speedup_vs_peft"] == pytest.approx(98 / 80)
    assert not any(k.startswith("B fp32 peft") for k in summary)


def test_paged_decode_smoke(tmp_path):
    from llamaworks.inference import native

    if not native.available():
        pytest.skip("the native kernels are not built (python -m llamaworks.inference.native build)")
    out = tmp_path / "paged_decode.json"
    run("paged_decode", "--preset", "tiny", "--max-batch", "2", "--lengths", "40,8", "--chat-lengths", "",
        "--steps", "2", "--rounds", "1", "--requests", "4", "--short-tokens", "8", "--long-tokens", "40",
        "--long-every", "2", "--max-tokens", "3", "--output", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test" and d["steps"]["mixed"]["greedy_tokens_equal"]
    assert d["engine_tokens_equal"] and all(r["generated_tokens"] == 4 * 3 for r in d["engine"])


@pytest.mark.slow
def test_prefill_smoke(tmp_path):
    out = tmp_path / "prefill.json"
    run("prefill", "--smoke", "--output", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test" and d["engine_tokens_equal"]
    assert {r["prefill_chunk"] for r in d["engine"]} == {None, 64}
    for case in d["passes"].values():  # the split prefill attention gives the gather path's logits
        assert case["max_abs_logit_diff"] < 1e-3 and case["parts"]["split"]["linear_ms"] > 0


@pytest.mark.slow
def test_serve_split_smoke(tmp_path):
    from llamaworks.inference import native

    if not native.available():
        pytest.skip("the native kernels are not built (python -m llamaworks.inference.native build)")
    out = tmp_path / "serve_split.json"
    run("serve_split", "--smoke", "--ab", "--output", str(out), "--label", "test")
    d = json.loads(out.read_text())
    assert d["machine"]["label"] == "test" and [r["changes_on"] for r in d["runs"]] == [True, False]
    layers = 4  # the tiny preset
    for r in d["runs"]:
        split = r["split"]
        assert split["prompt"]["passes"] >= 1 and split["decode"]["passes"] >= 1
        assert split["prompt"]["parts_s"]["prefill_attention"] > 0
        # RoPE and the pool write in a prompt pass: one call per layer with the changes on, three (RoPE of q, of k,
        # the write) off; a decode pass: none from Python with the changes on (the whole pass is one native call,
        # llamaworks::decode_step_paged), the modules' three per layer and their paged attention off
        on = r["changes_on"]
        assert split["prompt"]["calls_per_pass"]["rope_cache_write"] == layers * (1 if on else 3)
        assert split["decode"]["calls_per_pass"].get("rope_cache_write", 0) == (0 if on else layers * 3)
        assert (split["decode"]["parts_s"]["paged_attention"] > 0) == (not on)
