"""Speculative decoding in the serving engine (`serve --draft`, issue 18): tokens/s with and
without a draft model at batch 1 and 8, the acceptance rate, in process, same weights, same
requests, same run.

    .venv/bin/python benchmarks/speculative_serve.py --checkpoint DIR --draft DIR   # a trained pair
    .venv/bin/python benchmarks/speculative_serve.py                        # random config A
    .venv/bin/python benchmarks/speculative_serve.py --preset tiny --smoke

A trained pair (--checkpoint, --draft: model directories with the same tokenizer, e.g. two
`llamaworks demo` runs with the same --seed and --vocab-size, presets small and tiny) gives
acceptance rates that mean something; prompts are then --prompt-tokens tokens of text from
--text (default: a file of Python's standard library, the demo's corpus). Without them the
weights are random (nothing is downloaded) and the prompts random ids, so the acceptance rate
is a property of the drafts built here: the target's own first --draft-layers layers with its
embeddings, final norm and output layer (a truncated "self-speculative" draft), the target's
weights quantised (--quantized-draft int8/int4: a cheaper copy that mostly agrees), and the
target itself (--self-draft: every draft accepted, the draft as costly as the target: the
verify pass's overhead without any gain). Every model gets serve's load-time transforms
(fused projections, the native CPU kernels), as load_model gives them.
Workload: each batch size's requests at once (engine --max-batch = the batch), greedy, exactly
--max-tokens new tokens (no stop ids); every engine is built and warmed up by one request
first, then --repeats rounds each run every engine once (interleaved, medians reported).
Decode tokens/s counts the tokens after each request's first over the time from the first
request's first token to the last request's end (prefill excluded).
Greedy replies must be identical with and without the draft (checked: equal work).
JSON: benchmarks/results/speculative_serve.json with the machine (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time
from pathlib import Path

import torch
from engine_fixtures import PRESETS, NullTokenizer  # benchmarks/ is on sys.path
from machine import add_label_argument, machine_record, write_result

from llamaworks.inference.fuse import fuse_projections
from llamaworks.inference.kernels import use_native_kernels
from llamaworks.inference.quant import quantize_model
from llamaworks.model import ModelArgs, Transformer, build_model
from llamaworks.serve.engine import Engine, Request

ROOT = Path(__file__).resolve().parents[1]


def prepared(model: Transformer) -> Transformer:
    """serve's load-time transforms (inference/load.py): fused projections, native kernels."""
    fuse_projections(model)
    use_native_kernels(model)
    return model.eval()


def truncated(target: Transformer, layers: int) -> Transformer:
    """The (unprepared) target's first `layers` layers, its embeddings, final norm and output layer."""
    draft = Transformer(ModelArgs(**{**target.args.to_params(), "n_layers": layers})).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < layers})
    return prepared(draft)


def text_prompts(tokenizer, path: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens (bos first) from consecutive stretches of a text file."""
    ids = tokenizer.encode(path.read_text(errors="replace"), bos=False, eos=False)
    assert len(ids) >= n * length, f"{path} has {len(ids)} tokens, fewer than {n} x {length}"
    step = len(ids) // n
    return [[tokenizer.bos_id] + ids[i * step : i * step + length - 1] for i in range(n)]


def run_once(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    """The workload once on a started engine: throughput, the replies and the draft's counts."""
    before = dict(engine.stats())
    done: queue.Queue = queue.Queue()
    reqs = [Request(list(p), max_tokens, stop_ids=(), on_event=lambda ev, q=done: ev.kind != "text" and q.put(ev))
            for p in prompts]
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    events = [done.get(timeout=3600) for _ in reqs]
    end = time.perf_counter()
    assert all(ev.kind == "done" for ev in events), [ev.text for ev in events]
    first = min(r.first_token for r in reqs)
    row = {"tokens_per_s": sum(len(r.tokens) for r in reqs) / (end - t0),
           "decode_tokens_per_s": sum(len(r.tokens) - 1 for r in reqs) / (end - first),
           "replies": [r.tokens for r in reqs]}
    stats = engine.stats()
    if "spec_drafted" in stats:
        row.update({k: stats[f"spec_{k}"] - before[f"spec_{k}"] for k in ("drafted", "accepted", "rounds")})
    return row


def summary(runs: list[dict]) -> dict:
    """Medians over the repeats (each run's figures kept too), the acceptance over all of them."""
    out = {key: statistics.median(r[key] for r in runs) for key in ("tokens_per_s", "decode_tokens_per_s")}
    out["runs_decode_tokens_per_s"] = [r["decode_tokens_per_s"] for r in runs]
    if "drafted" in runs[0]:
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        out.update(acceptance_rate=accepted / drafted if drafted else 0.0, drafted=drafted, accepted=accepted,
                   verify_steps=sum(r["rounds"] for r in runs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="A", choices=list(PRESETS))
    ap.add_argument("--checkpoint", default=None, help="a trained target model directory (with --draft)")
    ap.add_argument("--draft", default=None, help="a trained draft model directory, the target's tokenizer")
    ap.add_argument("--text", default=str(Path(argparse.__file__)), help="where --checkpoint's prompts come from")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-layers", type=int, nargs="*", default=[1, 2], help="truncated drafts to run")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K: tokens the draft proposes per step")
    ap.add_argument("--self-draft", action="store_true", help="also the target itself as its draft")
    ap.add_argument("--quantized-draft", nargs="*", default=[], choices=["int8", "int4"],
                    help="also the target's weights quantised as its draft")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of every engine (medians reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="batch 1 and 2, 8 new tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative_serve.json"))
    add_label_argument(ap)
    a = ap.parse_args()
    if a.smoke:
        a.batches, a.prompt_tokens, a.max_tokens, a.draft_layers, a.repeats = [1, 2], 16, 8, [1], 1
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    if (a.checkpoint is None) != (a.draft is None):
        ap.error("--checkpoint and --draft go together")
    gen = torch.Generator().manual_seed(0)
    if a.checkpoint is not None:
        from llamaworks.inference.load import load_model
        from llamaworks.inference.speculative import check_same_vocabulary

        tok = load_model(a.checkpoint)[1]
        check_same_vocabulary(tok, load_model(a.draft)[1], a.checkpoint, a.draft)
        args = load_model(a.checkpoint)[0].args
        drafts = [(f"{Path(a.draft).name} ({load_model(a.draft)[0].args.n_layers} layers)", a.draft)]

        def target(raw: bool = False) -> Transformer:  # raw: unfused, for quantize_model
            return load_model(a.checkpoint, fuse=not raw)[0].eval()
    else:
        args = ModelArgs(**PRESETS[a.preset])
        tok = NullTokenizer(args.vocab_size)
        drafts = [(f"first {n} of {args.n_layers} layers", n) for n in a.draft_layers]

        def target(raw: bool = False) -> Transformer:
            model = build_model(args, seed=0).eval()  # the same weights every time, a cache of its own
            return model if raw else prepared(model)
    drafts += [(f"the target in {mode}", mode) for mode in a.quantized_draft]
    if a.self_draft:
        drafts.append(("the target itself", None))
    rows = []
    for batch in a.batches:
        if a.checkpoint is not None:
            prompts = text_prompts(tok, Path(a.text), batch + 1, a.prompt_tokens)
            prompts, warm = prompts[:batch], prompts[batch][:8]
        else:
            prompts = [torch.randint(3, args.vocab_size, (a.prompt_tokens,), generator=gen).tolist()
                       for _ in range(batch)]
            warm = torch.randint(3, args.vocab_size, (8,), generator=gen).tolist()
        # Every engine built, started and warmed up, then the runs interleaved: each repeat runs
        # every engine once, so load that changes during the run touches them all alike.
        engines = [(None, Engine(target(), tok, max_batch=batch))]
        for name, layers in drafts:
            if layers is None:
                draft = target()
            elif layers in ("int8", "int4"):
                draft = prepared(quantize_model(target(raw=True), layers, 32))
            elif isinstance(layers, str):
                from llamaworks.inference.load import load_model

                draft = load_model(layers)[0].eval()
            else:
                draft = truncated(target(raw=True), layers)
            engines.append((name, Engine(target(), tok, max_batch=batch, draft=draft, draft_tokens=a.draft_tokens)))
        runs: dict = {name: [] for name, _ in engines}
        try:
            for _, engine in engines:
                engine.start().complete(Request(warm, 4, stop_ids=()), timeout=3600)
            for _ in range(a.repeats):
                for name, engine in engines:
                    runs[name].append(run_once(engine, prompts, a.max_tokens))
        finally:
            for _, engine in engines:
                engine.stop(cancel=True)
        base = summary(runs[None])
        rows.append({"batch": batch, "draft": None, **base})
        print(f"batch {batch}: no draft {base['decode_tokens_per_s']:.1f} decode tokens/s "
              f"({base['tokens_per_s']:.1f} with prefill), median of {a.repeats}", flush=True)
        for name, _ in engines[1:]:
            identical = all(r["replies"] == runs[None][0]["replies"] for r in runs[name])
            row = {"batch": batch, "draft": name, "draft_tokens": a.draft_tokens, **summary(runs[name]),
                   "identical": identical}
            row.update(decode_speedup=row["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                       speedup=row["tokens_per_s"] / base["tokens_per_s"])
            rows.append(row)
            print(f"batch {batch}: draft = {name}, K={a.draft_tokens}: {row['decode_tokens_per_s']:.1f} decode "
                  f"tokens/s = {row['decode_speedup']:.2f}x no draft (with prefill {row['speedup']:.2f}x), "
                  f"acceptance {100 * row['acceptance_rate']:.1f}%, replies identical: {row['identical']}",
                  flush=True)
            assert identical, "greedy replies differ with the draft: not equal work"
    out = {"benchmark": "speculative decoding in the serving engine", "weights": a.checkpoint or "random",
           "draft": a.draft, "preset": None if a.checkpoint else a.preset, "draft_tokens": a.draft_tokens,
           "model": args.to_params(), "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
           "repeats": a.repeats, "rows": rows,
           "machine": machine_record(a.label, bandwidth=False, threads=torch.get_num_threads())}
    write_result(a.out, out)


if __name__ == "__main__":
    main()
