from __future__ import annotations

import contextlib
import gzip
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from llamaworks import cli
from llamaworks.data import mix as mixmod
from llamaworks.data import shards
from llamaworks.data.mix import MixConfig, _Draw, _interleave, load_mix_config, mix, plan_mix
from llamaworks.data.shards import open_token_dataset
from llamaworks.train.loader import TokenLoader

# Table 1: sampling proportion (%) and epochs over 1.4T tokens.
TABLE1 = {"commoncrawl": (67.0, 1.10), "c4": (15.0, 1.06), "github": (4.5, 0.64), "wikipedia": (4.5, 2.45),
          "books": (4.5, 2.23), "arxiv": (2.5, 1.06), "stackexchange": (2.0, 1.03)}


# ---------------------------------------------------------------------------- planning


def test_plan_hand_values():
    plan = plan_mix({"a": 100, "b": 50, "c": 10}, {"a": 2, "b": 1, "c": 1}, 200)
    assert {n: p["planned_tokens"] for n, p in plan.items()} == {"a": 100, "b": 50, "c": 50}
    assert {n: p["epochs"] for n, p in plan.items()} == {"a": 1.0, "b": 1.0, "c": 5.0}
    assert plan["a"]["weight"] == 0.5 and plan["c"]["available_tokens"] == 10
    # Default total: the sum of what is available (160), re-weighted.
    plan = plan_mix({"a": 100, "b": 50, "c": 10}, {"a": 2, "b": 1, "c": 1})
    assert [p["planned_tokens"] for p in plan.values()] == [80, 40, 40]
    assert [p["epochs"] for p in plan.values()] == [0.8, 0.8, 4.0]
    # Largest remainder: 10/3 each -> 4, 3, 3 (the tie goes to the first source); the sum is exact.
    assert [p["planned_tokens"] for p in plan_mix({"a": 5, "b": 5, "c": 5}, {"a": 1, "b": 1, "c": 1}, 10).values()] \
        == [4, 3, 3]
    assert [p["planned_tokens"] for p in plan_mix({"a": 9, "b": 9}, {"a": 1, "b": 2}, 8).values()] == [3, 5]
    # A weight of 0 draws nothing, even from an empty source.
    assert plan_mix({"a": 10, "b": 0}, {"a": 1, "b": 0}, 7)["b"] == \
        {"weight": 0.0, "available_tokens": 0, "planned_tokens": 0, "epochs": 0.0}
    with pytest.raises(ValueError, match="sources.b: weight 1 asks for 5 tokens but its inputs hold none"):
        plan_mix({"a": 10, "b": 0}, {"a": 1, "b": 1}, 10)


@pytest.mark.parametrize("total, scale", [(1.4e12, 1.0), (1.0e12, 1 / 1.4)])
def test_plan_reproduces_table1_epochs(total, scale):
    available = {n: round(w / 100 * 1.4e12 / e) for n, (w, e) in TABLE1.items()}  # the sizes Table 1 implies
    plan = plan_mix(available, {n: w for n, (w, _) in TABLE1.items()}, int(total))
    assert sum(p["planned_tokens"] for p in plan.values()) == int(total)
    for n, (w, e) in TABLE1.items():
        assert plan[n]["weight"] == pytest.approx(w / 100)
        assert plan[n]["epochs"] == pytest.approx(e * scale, abs=1e-9)
    assert round(plan["wikipedia"]["epochs"], 2) == (2.45 if scale == 1 else 1.75)


def test_dry_run_of_the_shipped_config_prints_table1(capsys):
    assert cli.main(["data", "mix", "--config", "mix_paper", "--dry-run"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    for n, (w, e) in TABLE1.items():
        assert rows[n][1] == f"{w:.1f}%" and rows[n][-2] == f"{e:.2f}", rows[n]
    assert rows["commoncrawl"][3] == f"{int(0.67 * 1.4e12):,}"


# ---------------------------------------------------------------------------- config


def test_config_defaults_and_overrides(tmp_path):
    path = tmp_path / "mix.toml"
    path.write_text('tokenizer = "t.model"\noutput = "out"\n[sources.CommonCrawl]\ninputs = ["a"]\n'
                    '[sources.stack_exchange]\ninputs = ["b"]\n[sources.mine]\ninputs = ["c"]\nweight = 3\n')
    cfg = load_mix_config(path, ["--seed", "5", "--sources.mine.weight", "7.5", "--total_tokens", "1e9"])
    assert list(cfg.sources) == ["CommonCrawl", "stack_exchange", "mine"]  # config order is kept
    assert [s.weight for s in cfg.sources.values()] == [67.0, 2.0, 7.5]
    assert cfg.seed == 5 and cfg.total_tokens == 10**9 and cfg.sources["mine"].inputs == ["c"]


@pytest.mark.parametrize("text, dry_run, match", [
    ('[sources.mine]\ninputs = ["a"]\n', False, r"sources.mine.weight is not set .* weight = 2.0"),
    ('[sources.c4]\ninputs = ["a"]\nweight = -1\n', False, r"sources.c4.weight must be a finite number >= 0"),
    ('[sources.c4]\ninputs = ["a"]\nweight = nan\n', False, r"sources.c4.weight must be a finite number"),
    ('[sources.c4]\ninputs = ["a"]\nwieght = 1\n', False, r"unknown config key\(s\) sources.c4.wieght"),
    ('[sources.c4]\ninputs = 3\n', False, r"sources.c4.inputs must be a list"),
    ('[sources."a b"]\ninputs = ["a"]\nweight = 1\n', False, r"source name 'a b' is not a plain name"),
    ('sources = 3\n', False, r"sources must be tables"),
    ('seeed = 1\n[sources.c4]\ninputs = ["a"]\n', False, r"unknown config key\(s\) seeed .* valid keys"),
    ('', False, r"the config has no sources; add one table per source"),
    ('[sources.c4]\ninputs = ["a"]\nweight = 0\n', False, r"every sources.NAME.weight is 0"),
    ('total_tokens = -1\n[sources.c4]\ninputs = ["a"]\n', False, r"total_tokens must be >= 0"),
    ('val_fraction = 1.0\n[sources.c4]\ninputs = ["a"]\n', False, r"val_fraction must be in \[0, 1\)"),
    ('[sources.c4]\n', False, r"sources.c4.inputs is empty"),
    ('[sources.c4]\ninputs = ["a"]\navailable_tokens = 5\n', False, r"sources.c4.available_tokens is a size "
                                                                     r"estimate for --dry-run; remove it"),
    ('output = "o"\n[sources.c4]\ninputs = ["a"]\n', True, r"tokenizer is not set"),
])
def test_bad_configs_name_the_key_and_the_fix(tmp_path, text, dry_run, match):
    path = tmp_path / "mix.toml"
    path.write_text(text if dry_run else 'tokenizer = "t.model"\noutput = "o"\n' + text)
    with pytest.raises(ValueError, match=match):
        mix(load_mix_config(path), dry_run=dry_run, progress=False)


# ---------------------------------------------------------------------------- drawing and interleaving


def test_draw_repeats_whole_epochs_in_new_orders_then_a_subset():
    lengths = np.arange(2, 9, dtype=np.int64)  # 7 documents, 35 tokens
    draw = _Draw(lengths, budget=90, seed=3)  # 2 epochs (70 tokens) + 20 more
    docs, lens, keys = draw.take(1.0)
    assert draw.take(1.0)[0].size == 0  # exhausted
    first, second, rest = docs[:7].tolist(), docs[7:14].tolist(), docs[14:].tolist()
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert len(set(rest)) == len(rest) and 0 < len(rest) < 7
    # Drawn while under budget: the last document starts before 90, and drawn tokens pass it by less than one.
    assert lens.sum() == draw.tokens >= 90 > draw.tokens - lens[-1] and draw.documents == len(docs)
    assert np.array_equal(lens, lengths[docs]) and np.all(np.diff(keys) > 0) and keys[0] == 0 and keys[-1] < 1
    again = _Draw(lengths, 90, seed=3).take(1.0)[0]
    assert np.array_equal(docs, again) and not np.array_equal(docs, _Draw(lengths, 90, seed=4).take(1.0)[0])
    small = _Draw(lengths, budget=12, seed=0).take(1.0)[0]  # larger than its budget: a subset, no repeats
    assert len(set(small.tolist())) == len(small) < 7


def test_every_prefix_of_the_interleaved_stream_keeps_the_proportions(monkeypatch):
    monkeypatch.setattr(mixmod, "_WINDOW_TOKENS", 5000)  # many windows: the merge across windows is exercised
    rng = np.random.default_rng(0)
    budgets = [60_000, 25_000, 15_000]
    lengths = [rng.integers(5, 200, 400), rng.integers(50, 300, 40), rng.integers(2, 30, 30)]
    draws = [_Draw(n, b, seed=i) for i, (n, b) in enumerate(zip(lengths, budgets))]
    parts = list(_interleave(draws))
    assert len(parts) == 20
    source = np.concatenate([p[0] for p in parts])
    lens = np.concatenate([p[2] for p in parts])
    per_source = np.zeros((len(lens), 3))
    per_source[np.arange(len(lens)), source] = lens
    drawn = np.cumsum(per_source, axis=0)  # (documents, 3) tokens of each source up to each document
    # Deficit round-robin: the sources' progress (drawn / budget) never differs by more than one document.
    progress = (drawn - per_source) / budgets  # progress of each source before each document
    max_doc = np.array([n.max() for n in lengths]) / budgets
    assert np.all(progress.max(axis=1) - progress.min(axis=1) <= max_doc.max() + 1e-12)
    assert [d.tokens for d in draws] == drawn[-1].tolist()
    assert all(b <= d.tokens < b + n.max() for d, b, n in zip(draws, budgets, lengths))
    assert draws[2].tokens > 3 * lengths[2].sum()  # the small source repeats (about 6 epochs)


# ---------------------------------------------------------------------------- end to end


WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


def _docs(name: str, n: int, words: tuple[int, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{name}-{i}", "text": f"{name} {i}: " + " ".join(rng.choice(WORDS) for _ in
                                                                      range(rng.randint(*words))) + ".",
             "source": name, "metadata": {}} for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three sources: a `data run` output folder, a plain JSONL file and a folder of JSONL shards."""
    root = tmp_path_factory.mktemp("mixsrc")
    sources = {"web": _docs("web", 120, (20, 80), 1), "code": _docs("code", 50, (20, 80), 2),
               "wiki": _docs("wiki", 12, (10, 40), 3)}
    run = root / "web_run"
    (run / "documents").mkdir(parents=True)
    for k in range(2):  # the layout `llamaworks data run` writes
        with gzip.open(run / "documents" / f"{k:05d}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in sources["web"][k::2])
    (run / "stats.json").write_text("{}")
    (run / "DATACARD.md").write_text("# not a document")
    (root / "code.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sources["code"]))
    (root / "wiki").mkdir()
    (root / "wiki" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sources["wiki"]))
    return {"inputs": {"web": [str(run)], "code": [str(root / "code.jsonl")], "wiki": [str(root / "wiki")]},
            "docs": sources}


WEIGHTS = {"web": 50.0, "code": 30.0, "wiki": 20.0}


def _config(corpus, tokenizer, out: Path, **kw) -> MixConfig:
    sources = {n: {"inputs": corpus["inputs"][n], "weight": w} for n, w in WEIGHTS.items()}
    return MixConfig(tokenizer=str(tokenizer.path), output=str(out), shard_tokens=1000, val_fraction=0.1,
                     sources=sources, **{"workers": 1, **kw})


def _stream(out: Path, split: str = "train") -> np.ndarray:
    m = open_token_dataset(out)
    return np.concatenate([np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]])


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.bin"))}


@pytest.fixture(scope="module")
def mixed(corpus, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix") / "out"
    return out, mix(_config(corpus, tiny_tokenizer, out), progress=False)


def test_mix_draws_each_source_by_token_share(mixed, corpus, tiny_tokenizer):
    out, report = mixed
    # Which source (and document) each encoded document is: texts are unique.
    ids = {}
    for name, docs in corpus["docs"].items():
        for d, toks in zip(docs, tiny_tokenizer.encode_batch([d["text"] for d in docs], bos=True, eos=True)):
            ids[tuple(toks)] = (name, d["id"])
    tokens = _stream(out)
    starts = np.flatnonzero(tokens == tiny_tokenizer.bos_id).tolist() + [len(tokens)]
    drawn = [ids[tuple(tokens[a:b].tolist())] for a, b in zip(starts, starts[1:])]  # KeyError: a corrupt document
    train = report["splits"]["train"]
    assert train["tokens"] == len(tokens) == open_token_dataset(out)["splits"]["train"]["tokens"]
    for name, w in WEIGHTS.items():
        s = train["sources"][name]
        assert s["documents"] == sum(1 for n, _ in drawn if n == name)
        assert s["planned_tokens"] <= s["tokens"] < s["planned_tokens"] + 100  # overshoot < one document
        assert s["share"] == pytest.approx(w / 100, abs=0.01)
        assert s["epochs"] == pytest.approx(s["tokens"] / s["available_tokens"])
    assert sum(s["available_tokens"] for s in train["sources"].values()) == \
        sum(s["planned_tokens"] for s in train["sources"].values())  # default total: all available tokens
    # wiki is small: whole epochs of every training document, plus a part; web is subsampled.
    wiki = train["sources"]["wiki"]
    assert wiki["epochs"] > 2
    counts = {i: sum(1 for n, j in drawn if j == i) for n, i in drawn if n == "wiki"}
    assert len(counts) == wiki["available_documents"] and min(counts.values()) >= int(wiki["epochs"])
    assert max(counts.values()) <= int(wiki["epochs"]) + 1
    web = [i for n, i in drawn if n == "web"]
    assert train["sources"]["web"]["epochs"] < 1 and len(set(web)) == len(web)
    # Any prefix holds the proportions: the first quarter and half of the stream too.
    lens = np.diff(starts)
    for frac in (0.25, 0.5):
        upto = np.searchsorted(np.cumsum(lens), frac * len(tokens))
        for name, w in WEIGHTS.items():
            share = sum(n_ for (n, _), n_ in zip(drawn[:upto], lens[:upto]) if n == name) / lens[:upto].sum()
            assert share == pytest.approx(w / 100, abs=0.03), (frac, name)
    # The held-out documents of each source form val/ and never appear in train/.
    val = _stream(out, "val")
    vstarts = np.flatnonzero(val == tiny_tokenizer.bos_id).tolist() + [len(val)]
    held = {ids[tuple(val[a:b].tolist())] for a, b in zip(vstarts, vstarts[1:])}
    assert held and not held & set(drawn)
    assert not any(d["text"].startswith("#") for d in corpus["docs"]["web"])  # DATACARD.md was not read
    assert json.loads((out / "mix.json").read_text()) == report


def test_the_trainers_loader_reads_the_mix(mixed):
    out, _ = mixed
    loader = TokenLoader(out, "train", batch_size=2, seq_len=16)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()
    m = open_token_dataset(out)
    assert m["vocab_size"] == 512 and m["splits"]["train"]["shards"][0] == {"file": "train/00000.bin", "tokens": 1000}
    assert m["sources"]["wiki"]["tokens"] > 0 and m["mix"] == "mix.json"


def test_same_seed_same_bytes_and_rerun_is_a_no_op(mixed, corpus, tiny_tokenizer, tmp_path, capsys):
    out, report = mixed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert mix(_config(corpus, tiny_tokenizer, out), progress=False) == report
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    again = tmp_path / "again"
    mix(_config(corpus, tiny_tokenizer, again), progress=False)
    assert _shard_bytes(again) == _shard_bytes(out) and len(_shard_bytes(out)) > 10
    other = tmp_path / "seed1"
    mix(_config(corpus, tiny_tokenizer, other, seed=1), progress=False)
    assert _shard_bytes(other) != _shard_bytes(out)


def test_windows_written_out_of_order_make_the_same_shards(mixed, corpus, tiny_tokenizer, tmp_path, monkeypatch):
    # The workers write windows at their offsets in any order; a shard is sealed (renamed) only once every
    # window in it is written. Four threads that finish windows late and out of order, small windows
    # straddling shards: the same bytes, and no shard renamed while a window of it is still unwritten.
    out, _ = mixed
    rng, written, sealed = random.Random(0), [], []

    def late(key, streams, dtype, window, folder, *args):
        time.sleep(rng.random() * 0.004)
        n = shards.write_window(key, streams, dtype, window, folder, *args)
        written.append((folder, window.at, window.at + n))
        return n

    seal = mixmod._seal

    def checked_seal(out_, split, shard, tokens, itemsize):
        lo, hi = shard * 1000, shard * 1000 + tokens
        covered = sorted((a, b) for f, a, b in list(written) if f.endswith(split) and a < hi and b > lo)
        assert covered and covered[0][0] <= lo and covered[-1][1] >= hi, (split, shard, covered)
        assert all(x[1] >= y[0] for x, y in zip(covered, covered[1:])), (split, shard, covered)  # no hole
        sealed.append((split, shard))
        return seal(out_, split, shard, tokens, itemsize)

    @contextlib.contextmanager
    def threads(workers, tokenizer):
        with ThreadPoolExecutor(4) as ex:
            yield ex

    monkeypatch.setattr(mixmod, "write_window", late)
    monkeypatch.setattr(mixmod, "_seal", checked_seal)
    monkeypatch.setattr(mixmod, "pool_executor", threads)
    monkeypatch.setattr(mixmod, "_WINDOW_TOKENS", 300)
    mix(_config(corpus, tiny_tokenizer, tmp_path / "late", workers=2), progress=False)
    assert _shard_bytes(tmp_path / "late") == _shard_bytes(out)
    assert len(sealed) == len(_shard_bytes(out)) > 10
    starts = [a for _, a, _ in written]
    assert starts != sorted(starts)  # some windows did finish out of order


def test_prepares_workers_write_the_mix(mixed, corpus, tiny_tokenizer, tmp_path, monkeypatch):
    # With workers, the windows are gathered and written by prepare's (shared) pool: the same bytes.
    out, _ = mixed
    monkeypatch.setattr(mixmod, "_WINDOW_TOKENS", 300)
    try:
        mix(_config(corpus, tiny_tokenizer, tmp_path / "pool", workers=2), progress=False)
    finally:
        shards._drop_pool()
    assert _shard_bytes(tmp_path / "pool") == _shard_bytes(out)
    assert not list((tmp_path / "pool").rglob("*.tmp"))


def test_a_killed_mix_resumes_to_the_same_bytes(mixed, corpus, tiny_tokenizer, tmp_path, monkeypatch):
    out, _ = mixed
    crashed = tmp_path / "crashed"
    copy_runs, calls = shards.TokenFiles.copy_runs, []

    def dying_copy(self, *args):  # the process "dies" in the middle of the train split
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return copy_runs(self, *args)

    monkeypatch.setattr(shards.TokenFiles, "copy_runs", dying_copy)
    # Small interleaving windows, so shards are written between reads (the order does not depend on them).
    monkeypatch.setattr(mixmod, "_WINDOW_TOKENS", 300)
    with pytest.raises(KeyboardInterrupt):
        mix(_config(corpus, tiny_tokenizer, crashed), progress=False)
    monkeypatch.setattr(shards.TokenFiles, "copy_runs", copy_runs)
    assert not (crashed / "manifest.json").exists()  # incomplete, and it says so
    done = sorted((crashed / "train").glob("*.bin"))
    assert len(done) >= 3 and list((crashed / "train").glob("*.tmp"))  # finished shards + an interrupted one
    inodes = {p.name: p.stat().st_ino for p in done}
    cache_marker = (crashed / ".mix/sources/web/cache.json").stat().st_mtime_ns
    mix(_config(corpus, tiny_tokenizer, crashed), progress=False)
    assert _shard_bytes(crashed) == _shard_bytes(out)
    assert {p.name: p.stat().st_ino for p in done} == inodes  # finished shards were not rewritten
    assert (crashed / ".mix/sources/web/cache.json").stat().st_mtime_ns == cache_marker  # nor re-tokenised
    assert not list(crashed.rglob("*.tmp"))


def test_a_changed_config_needs_overwrite_and_keeps_the_caches(mixed, corpus, tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    mix(_config(corpus, tiny_tokenizer, out), progress=False)
    marker = (out / ".mix/sources/code/cache.json").stat().st_mtime_ns
    cfg = _config(corpus, tiny_tokenizer, out, total_tokens=3000)
    with pytest.raises(ValueError, match="holds a mix of another config.*pass --overwrite"):
        mix(cfg, progress=False)
    report = mix(cfg, overwrite=True, progress=False)
    assert 3000 <= report["splits"]["train"]["tokens"] < 3300 and open_token_dataset(out)["tokens"] > 3000
    assert (out / ".mix/sources/code/cache.json").stat().st_mtime_ns == marker  # same inputs: not re-tokenised
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that are no mix"):
        mix(_config(corpus, tiny_tokenizer, tmp_path / "busy"), progress=False)


def test_input_errors_name_the_source(corpus, tiny_tokenizer, tmp_path):
    cfg = _config(corpus, tiny_tokenizer, tmp_path / "a")
    cfg.sources["code"].inputs = [str(tmp_path / "missing")]
    with pytest.raises(FileNotFoundError, match="missing"):
        mix(cfg, progress=False)
    unfinished = tmp_path / "run"
    (unfinished / "documents").mkdir(parents=True)
    cfg = _config(corpus, tiny_tokenizer, tmp_path / "b")
    cfg.sources["code"].inputs = [str(unfinished)]
    with pytest.raises(ValueError, match=r"sources.code: the `llamaworks data run` in .* has not finished"):
        mix(cfg, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jsonl").write_text("")
    cfg = _config(corpus, tiny_tokenizer, tmp_path / "c")
    cfg.sources["code"].inputs = [str(tmp_path / "empty")]
    with pytest.raises(ValueError, match="sources.code: no documents found"):
        mix(cfg, progress=False)
    cfg = _config(corpus, tiny_tokenizer, tmp_path / "d")
    cfg.tokenizer = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer .*nope.model.* not found"):
        mix(cfg, progress=False)
