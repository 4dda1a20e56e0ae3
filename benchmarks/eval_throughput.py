"""Multiple-choice scoring speed: llamaworks' EvalModel vs lm-evaluation-harness' transformers
backend (HFLM), same random `small` weights, same HellaSwag-like fixture, same run.

    .venv/bin/python benchmarks/eval_throughput.py            # 200 questions x 4 endings, batch 16, fp32
    .venv/bin/python benchmarks/eval_throughput.py --repeat 3 # best of 3 runs per row (noisy machines)
    .venv/bin/python benchmarks/eval_throughput.py --limit 24 --output /tmp/x.json   # a quick check

Rows: llamaworks' own path (`evaluate_mc` over `EvalModel`), llamaworks through lm-eval
(`LlamaworksLM` in `simple_evaluate`) and lm-eval's HFLM on the same weights exported to a
transformers folder (`simple_evaluate(model=HFLM)`), both lm-eval rows on the same local task
YAML. Scored examples/s = questions / wall time of the scoring (model loading excluded,
lm-eval's request building included in its rows); every row runs a few questions untimed first
(warm-up, and lm-eval's dataset cache); with --repeat N each row is timed N times, the rows in
rotating order, and the best time is kept (noisy machines). Same weights, same requests,
fp32, the same thread count and the same --batch (sequences per forward pass) on both sides.
The per-request log-likelihoods of the three are checked to agree (exit status 1 beyond
1e-3). Prints a table and the speedups, writes JSON (benchmarks/results/eval_throughput.json).
Needs `pip install 'llamaworks[harness]'`. Target (issue 5): at least 2x HFLM's examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from machine import add_label_argument, machine_record, write_result  # noqa: E402 - benchmarks/ is on sys.path

WARMUP = 4  # questions run untimed before each row
WORDS = ("the a man woman child dog ball kitchen knife bowl water rope wall climbs holds pours cuts throws runs "
         "walks slowly quickly then and into onto over under while camera shows people outside inside table "
         "paint brush floor window car road bike helmet shoes ice skates snow hill top bottom red blue").split()
YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def fixture(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-like questions: a 40-70 word context, 4 endings of 12-30 words."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"query": f"Activity: {words(40, 70).capitalize()}.", "endings": [words(12, 30) + "." for _ in range(4)],
             "label": rng.randrange(4), "id": str(i)} for i in range(n)]


def corpus() -> list[str]:
    here = Path(__file__).resolve()
    files = []
    for root in (here.parents[1] / "shared" / "corpora" / "shakespeare", here.parents[2] / "shared" / "corpora" /
                 "shakespeare"):
        files = files or sorted(root.glob("*_gut.txt"))[:6]
    if files:
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    rng = random.Random(0)  # made-up words: enough distinct text for 4096 pieces
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(8000)]
    return [" ".join(rng.choice(vocab + WORDS) for _ in range(5000)) for _ in range(80)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", "--n", dest="n", type=int, default=200, help="questions (4 endings each)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per forward pass, both backends")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per backend (rotating order); best is kept")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "eval_throughput.json"))
    add_label_argument(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = machine_record(a.label, libraries=("lm-eval",))

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llamaworks.convert.formats import save_checkpoint
    from llamaworks.eval.harness import LlamaworksLM
    from llamaworks.eval.lm import EvalModel
    from llamaworks.eval.run import evaluate_mc
    from llamaworks.eval.tasks import MCExample, MCTask
    from llamaworks.model import ModelArgs, build_model
    from llamaworks.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    tok = Tokenizer.train(tmp / "tokenizer.model", documents=corpus(), vocab_size=4096, seed=0)
    args = ModelArgs.from_name("small", vocab_size=tok.vocab_size)
    model = build_model(args, seed=0).eval()
    save_checkpoint("hf", model, tok, tmp / "hf", overwrite=True)
    docs = fixture(a.n)
    with open(tmp / "bench.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "bench_mc.yaml").write_text(YAML.format(data=tmp / "bench.jsonl"))
    manager = TaskManager(include_path=str(tmp / "tasks"))

    # lm-eval's multiple choice scores (query, " " + ending): the same requests here.
    task = MCTask("bench_mc", "HellaSwag-like", "char_norm", lambda r: r, "", "")
    examples = [MCExample(d["query"], [" " + e for e in d["endings"]], d["label"], d["id"]) for d in docs]
    lm = EvalModel(model, tok, batch_size=a.batch)
    hf = HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=a.batch, device="cpu")

    def own(limit=None):
        res = evaluate_mc(lm, task, examples[:limit])
        return res["acc"], [x for e in res["examples"] for x in e["loglikelihoods"]]

    def harness(lm_obj):
        def run(limit=None):
            out = lm_eval.simple_evaluate(model=lm_obj, tasks=["bench_mc"], task_manager=manager, limit=limit,
                                          log_samples=True)
            samples = sorted(out["samples"]["bench_mc"], key=lambda s: s["doc_id"])
            return out["results"]["bench_mc"]["acc_norm,none"], [float(r[0][0]) for s in samples for r in s["resps"]]
        return run

    backends = {"llamaworks EvalModel": own, "llamaworks via lm-eval": harness(LlamaworksLM(lm)),
                "lm-eval HFLM (transformers)": harness(hf)}
    for run in backends.values():
        run(WARMUP)
    times: dict[str, list[float]] = {name: [] for name in backends}
    accs, lls = {}, {}
    for rep in range(a.repeat):
        names = list(backends)[rep % len(backends):] + list(backends)[: rep % len(backends)]  # rotate the order
        for name in names:
            t0 = time.perf_counter()
            accs[name], lls[name] = backends[name]()
            times[name].append(time.perf_counter() - t0)
    rows = [(name, min(times[name]), accs[name]) for name in backends]  # best of --repeat runs

    ref = lls["llamaworks EvalModel"]
    agree = {k: max(abs(x - y) for x, y in zip(ref, v)) for k, v in lls.items()}
    base = rows[-1][1]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nsmall preset ({n_params / 1e6:.1f}M parameters, random weights), {a.n} questions x 4 "
          f"endings, batch {a.batch}, fp32, {a.threads} threads, best of {a.repeat}, "
          f"{machine['cpu_model']}, {machine['label']}")
    print(f"{'backend':<30} {'seconds':>8} {'examples/s':>11} {'vs HFLM':>8} {'acc_norm':>9}")
    for name, dt, acc in rows:
        print(f"{name:<30} {dt:>8.2f} {a.n / dt:>11.1f} {base / dt:>7.2f}x {acc:>9.3f}")
    print("max |log-likelihood difference| vs llamaworks:", {k: f"{v:.1e}" for k, v in agree.items()})
    speedup = {name: base / dt for name, dt, _ in rows[:-1]}
    print("speedup vs lm-eval HFLM (target >= 2x): "
          + ", ".join(f"{name} {s:.2f}x" for name, s in speedup.items()))
    out = {"preset": "small", "params": n_params, "questions": a.n, "choices": 4,
           "batch_size": a.batch, "threads": a.threads, "repeat": a.repeat, "dtype": "float32",
           "torch": torch.__version__, "machine": machine,
           "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
           "rows": [{"backend": n, "seconds": dt, "examples_per_s": a.n / dt, "speedup_vs_hflm": base / dt,
                     "acc_norm": acc, "all_seconds": times[n]} for n, dt, acc in rows],
           "max_abs_loglik_diff": agree, "target_speedup": 2.0}
    write_result(a.output, out)
    if max(agree.values()) > 1e-3:
        print("log-likelihoods disagree by more than 1e-3: the speeds do not compare the same computation")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
