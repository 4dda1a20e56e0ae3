"""Decode speed: llamaworks vs transformers' generate, same random weights, same run.

    .venv/bin/python benchmarks/decode.py            # config A, batch 1, prompt 128, 256 new, greedy, fp32
    .venv/bin/python benchmarks/decode.py --batch 8 --no-compile

Prints a table and writes JSON (benchmarks/results/decode.json by default). Figures
are medians over --repeats runs after a warm-up; both sides decode exactly the same
number of tokens (eos is disabled) and the greedy tokens are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from llamaworks.generate import generate_ids
from llamaworks.model import ModelArgs, build_model, count_parameters

# "Config A" of the issue tracker: about 60M parameters, the shape of the paper's models.
CONFIG_A = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=2048)


def time_llamaworks(model, prompt: list[list[int]], new: int, compile: bool) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    chunks = list(generate_ids(model, prompt, new, temperature=0.0, sync_every=64, compile=compile))
    dt = time.perf_counter() - t0
    toks = torch.cat([c[0] for c in chunks], dim=1)
    return dt, toks.tolist()


def time_transformers(hf, prompt: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompt)
    t0 = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, out[:, ids.shape[1]:].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time llamaworks with torch.compile on the decode step")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from llamaworks.convert.hf import hf_config_dict, to_hf_state_dict

    args = ModelArgs(**CONFIG_A)
    n_params = count_parameters(args)
    model = build_model(args, seed=0).eval()
    cfg = LlamaConfig(**hf_config_dict(args))
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), args))

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    # Memory-bandwidth bound: every decode step reads all weights once (fp32) plus the cache.
    weight_bytes = 4 * n_params

    variants = {"transformers": lambda: time_transformers(hf, prompt, a.new_tokens),
                "llamaworks": lambda: time_llamaworks(model, prompt, a.new_tokens, False)}
    if a.compile:
        variants["llamaworks+compile"] = lambda: time_llamaworks(model, prompt, a.new_tokens, True)
    results, tokens = {}, {}
    with torch.inference_mode():
        for name, fn in variants.items():
            fn()  # warm-up (and compilation)
            times = []
            for _ in range(a.repeats):
                dt, toks = fn()
                times.append(dt)
            tokens[name] = toks
            med = statistics.median(times)
            results[name] = {"seconds": med, "tokens_per_s": a.batch * a.new_tokens / med, "runs": times}

    base = results["transformers"]["tokens_per_s"]
    agree = {k: tokens[k] == tokens["transformers"] for k in tokens}
    print(f"decode benchmark: config A ({n_params / 1e6:.1f}M params), batch {a.batch}, prompt {a.prompt_len}, "
          f"{a.new_tokens} new tokens, greedy, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'implementation':<22}{'tokens/s':>10}{'vs transformers':>17}{'same tokens':>13}")
    for k, r in results.items():
        print(f"{k:<22}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base:>16.2f}x{str(agree[k]):>13}")
    bound = 52e9 / weight_bytes  # tokens/s per sequence if only weight reads cost time (52 GB/s measured here)
    print(f"(weight-read bound at 52 GB/s: {bound:.0f} steps/s; time includes the prefill of {a.prompt_len} tokens)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": CONFIG_A, "params": n_params, "batch": a.batch, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "results": results, "same_tokens": agree,
        "speedup_vs_transformers": {k: r["tokens_per_s"] / base for k, r in results.items()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
