"""The mixer's output bytes are pinned: a fixed corpus, tokenizer and seed give these exact shards.

The hashes were recorded with the per-document mixer (before the batch tokenising and bulk
writing of issue 20), so any rewrite of `data mix` must keep them: same config and seed, same
bytes. The corpus (five sources in every input layout `data mix` reads) and the tokenizer are
built here from fixed seeds; the tokenizer's own hash is checked first, so a SentencePiece
release that trains a different model says so instead of failing on every shard.

Regenerate (only for a deliberate format change): `.venv/bin/python tests/data/test_mix_golden.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

from llamaworks.data import mix as mixmod
from llamaworks.data import shards
from llamaworks.data.mix import MixConfig, mix
from llamaworks.tokenizer import Tokenizer

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which king queen "
         "def return import class self value list print x y 0 1 2 42 theorem proof lemma let = + ( ) { }").split()

# Tokenizer sha256, then every output shard's sha256, recorded with the mixer of commit 7e4f4e2.
GOLDEN_TOKENIZER = "f19df0b7cfce3c263978f9e9c0204c45b4949ade7779993c4bfc2c8388d036a9"
GOLDEN: dict[str, dict[str, str]] = {
    "default": {
        "train/00000.bin": "303e71e8c9f01f7ebbbe2a67430498e0a7c01df6ee826151a14cd18842be27d8",
        "train/00001.bin": "502e0c686047d68553e3aad7ad572b18bd88447b654cc2456f5b28103356c3a1",
        "train/00002.bin": "2b0997d5d9944b50723ec7d1ff0d89ddda64f4b6ec448fa646d8b2a8b401209e",
        "train/00003.bin": "55fd8d8215fd65039503f029164dc6f0ca32da06eb26cf8a44c47b536cb178f3",
        "train/00004.bin": "1212d4c6736848b73d70b79ffc8f535710266cfc7e66553e8257504ef1b9dea9",
        "train/00005.bin": "1ca9ee1b16385d0331723a8512da1a056baef60c55612e0daf5cd2ab334a0a6a",
        "train/00006.bin": "251dc54e0ca5411a3d309526f80fad2b27f91855bde53a183e8c5746a1f0bdb5",
        "train/00007.bin": "1570ae1dfcda5062f4f6fa1753cc744d10995b8fab4dacb7da69a825ee8a2aa6",
        "train/00008.bin": "6e780d9b3b00bad9fe3c48b1b068fc228d6f5c123aa4cc75f220162bc75e6963",
        "train/00009.bin": "d7715e0e88a652c59179369816a42e92f3e1aa637c6f6200ac6bf2aae9034f4f",
        "train/00010.bin": "9da38666e7e1c84e747c55b086810d001669d51f4d46ea559e279c37155251e0",
        "train/00011.bin": "78383c74d30b6b5fc02e95752341ea09592ff916019743aa9b36f8b268972332",
        "train/00012.bin": "1c4a3a37b21a69e9fed9b7c7b642cb088f578392bd8646596578ac7c35a844df",
        "train/00013.bin": "c4924bf3faf190bc9ba5cfd07ac8e2c2d709baeb57f3e6c6bebc8f8814ec3217",
        "train/00014.bin": "dd4921b5e9347cff0c6696442252a6200d5afae0c170ce07e2cbbd9894087d41",
        "val/00000.bin": "e6b717000545297cbf8860a513bd3c8884b5013ac256a398f630970a38db3d9e",
        "mix.json:splits": "1a2045bfbdb8ab5aecdb3de3b5b89f5328b63a59be52fbdb7215174ee2793345",
        "manifest.json": "8657269afd611347e979d6b6a1c9024f4560678937918e1bde01e893bfed95cf"
    },
    "epochs": {
        "train/00000.bin": "bee13c6f47916430e7f00f9dda8d4802a9aab6f6e233b41fed3c00bb0976a1a9",
        "train/00001.bin": "903640ad888664715bd7aff8c94c2e31219256cf51b002fc2d9d45988b358928",
        "train/00002.bin": "0fcbd5524b87eb049d1013f0759ae39b3af0632e8d4ea6f5ca20ab5ce05b1022",
        "train/00003.bin": "7476df7682b28f6d740237e649c48bc3115597b4dd92833ea2af2c50bc1cba9c",
        "train/00004.bin": "8d68a85963a8727b369c404c463ca1e4dea0d3d55841ddb9a78bffb4763c1358",
        "train/00005.bin": "c9ea4bca41d9beb8b336852a4b117374986c737592e4f4a793421cd0570ca77b",
        "train/00006.bin": "67509ee590b0794f952ece1a8519e6fcf41d602e3da8d3fb9da750f6acfaa1f1",
        "train/00007.bin": "e551caec6899cf1175b105779e200c45b4e60e75b59195a25b831c86fe175b04",
        "train/00008.bin": "000d7b1fc599723fa3794a063a442abcc4ee62a8ad890dd43294f19128d3e6a3",
        "train/00009.bin": "fa1f674bba15df9f8f2f872da3ab78e3647733863b736da050fff94ca30aa876",
        "train/00010.bin": "26febe71149a54958b2b9e60b79a19a73b0dc172993b539c822ed8a29f1aaaa8",
        "train/00011.bin": "e15c877a82e5881c4731bec92fe3aa5a3171156723084a02307d3859d82b3eaf",
        "train/00012.bin": "2d25d5e948eae124a7844f6e1258ade20f058632c2dffa7d2cb6b19858c13224",
        "train/00013.bin": "237e6ccf67e451c77e9f2b74fc18a2f594437c2820e93aef00eac795aa3d75e0",
        "train/00014.bin": "b8ba944b1bbae49c5b474f49fc2c8ca05152a2527d9542317f85e2ded08d3f6d",
        "train/00015.bin": "de8c08b03d97a3d4bd7c7aa8900f0afb8198c1aafd72f281d0e8c88e5bd2fc6d",
        "train/00016.bin": "22b8e3c8b1f5294eecbfbd219417cb5a6b54abf17a4fafef8f6ed67320d3984f",
        "train/00017.bin": "22b52fbc6831002efea7d46311fd536e5d70eb4a460e67ffe396094ea6252393",
        "train/00018.bin": "10b1654da7f5a62a555c18ada9ffa2d297bb7ddda5910089123443626f1386a0",
        "train/00019.bin": "9bb7b724274f8e5aa053f77d90d6843b05d71458416c457086e279c8be2e8081",
        "train/00020.bin": "34812c616a39904c2553d421dbae887766c3b50e53fa89110e156d9c0550df33",
        "train/00021.bin": "b0bf08b4d73741057d3271fe648132f73029596087dee3d1b41d153e898b56fc",
        "train/00022.bin": "c6934243147a8782a7662b2386445a7f820bd8cfcc4b6d24dcf9c232284b2024",
        "train/00023.bin": "90abe6970329540cf5d07c53a5396d0f422a313c60b0fdcbbe6ea9d6f2518803",
        "train/00024.bin": "d28a8338ce87906149fa077b33fb4f415345f9613622ab79f2a9785890456354",
        "train/00025.bin": "95cc8ddefb583d550be200298911a791b9dbfdcf2af53f8968251f6bec4fc5da",
        "train/00026.bin": "4acd337603ae2834c83490b5c2784b89a098e8ec5a823b5ffafcfd958d01358c",
        "train/00027.bin": "b7eaa0bd3fdb6a128f3847c56b334db3fddb8b57426070a59e932c0df8b716c2",
        "train/00028.bin": "d7983d954851e66b74dfd33d10432b280c3899540a1c59a131b64e17fb5d0349",
        "train/00029.bin": "b2228763e94c78489340144eca77ed5a415b98c9b8614ef41f7e968b6b3d7eec",
        "train/00030.bin": "a902c2e888311ee9af842e8509d59e185347f7eca40e269ab268a47f626f826a",
        "train/00031.bin": "a6ea221b267b243e71e7b3103f5ed4f5f477084b9ef59926d4f4598e2449687b",
        "train/00032.bin": "e427cddb7fa9c43b19213bd09e859017a84fc2efc662a3ada61663857e91c4c7",
        "train/00033.bin": "561ef87ac77d874d4764536b093fc0d2f36d10199fe21680e44057ce459ea136",
        "train/00034.bin": "97e0cf2056dd4b1468746525c187d5e2a81463fce5be646822eb1bbc6b6eeb49",
        "train/00035.bin": "49f7ff84a796ec7f1ff8fb8d7eec440671e1f2c4478ebd4fd75a80cbdac718c5",
        "train/00036.bin": "dcf71d5a0cb40ae7780c32461a7bf6e74a18d0a8a9da2e15587d69d70810645b",
        "val/00000.bin": "78f1291877b61bb7c11943fd1712eb59e986e1cee3099a52ce1f21094463e2d6",
        "val/00001.bin": "c21654909a6284e6aafdd6b3094d32d1d94a72514ee582f70101e483ab840c25",
        "mix.json:splits": "72ddf520dde6bdb773fbabca684bdaa9ae75926ef40e5d7f4be3fbfe29952481",
        "manifest.json": "a90b0b238a166de7fbef2b326ee6cdd4e489f58d6f201b4ca0f81541f36dde30"
    }
}


def _text(rng: random.Random, name: str, i: int, words: tuple[int, int]) -> str:
    lines = []
    for _ in range(rng.randint(1, 6)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))))
    return f"{name} {i}:\n" + "\n".join(lines) + rng.choice([".", "!", "?", ""])


def build_corpus(root: Path) -> dict[str, list[str]]:
    """Five sources, ~3,000 documents: a `data run` output (gzip shards), one JSONL file with ids,
    a folder of JSONL shards without ids, a small JSONL (repeated over epochs), plain .txt files."""
    rng = random.Random(20)
    run = root / "cc_run"
    (run / "documents").mkdir(parents=True)
    for k in range(3):
        with gzip.open(run / "documents" / f"{k:05d}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(k, 1500, 3):
                f.write(json.dumps({"id": f"cc-{i}", "text": _text(rng, "cc", i, (5, 40)), "source": "cc"}) + "\n")
    (run / "stats.json").write_text("{}")
    with open(root / "c4.jsonl", "w", encoding="utf-8") as f:
        for i in range(900):
            text = _text(rng, "c4", i, (3, 30)) if i % 97 else "   "  # a few empty documents
            f.write(json.dumps({"id": f"c4-{i}", "text": text}) + "\n")
    (root / "github").mkdir()
    for k in range(4):
        with open(root / "github" / f"part-{k}.jsonl", "w", encoding="utf-8") as f:
            for i in range(120):
                f.write(json.dumps({"text": _text(rng, "gh", 1000 * k + i, (2, 60))}) + "\n")
    with open(root / "wiki.jsonl", "w", encoding="utf-8") as f:
        for i in range(70):
            f.write(json.dumps({"id": f"w{i}", "text": _text(rng, "wiki", i, (10, 25))}) + "\n")
    (root / "books").mkdir()
    for i in range(25):
        (root / "books" / f"book{i:02d}.txt").write_text(_text(rng, "book", i, (40, 120)) * 3, encoding="utf-8")
    (root / "books" / "cover.bin").write_bytes(b"\x89PNG\0\0binary")  # skipped: not text
    return {"commoncrawl": [str(run)], "c4": [str(root / "c4.jsonl")], "github": [str(root / "github")],
            "wikipedia": [str(root / "wiki.jsonl")], "books": [str(root / "books")]}


def build_tokenizer(path: Path) -> Tokenizer:
    rng = random.Random(3)
    docs = [_text(rng, "doc", i, (5, 40)) for i in range(400)]
    return Tokenizer.train(path, documents=docs, vocab_size=400, seed=0)


CASES = {
    # Table 1 weights by name, every available token: the large sources subsampled, the small repeated.
    "default": {"seed": 7},
    # More tokens than the sources hold: whole epochs of every source in new orders, a longer val split.
    "epochs": {"seed": 11, "total_tokens": 900_000, "val_fraction": 0.1},
}


def config(case: str, inputs: dict[str, list[str]], tokenizer: Path, out: Path) -> MixConfig:
    options = {"shard_tokens": 25_000, "val_fraction": 0.05, "workers": 1, **CASES[case]}
    return MixConfig(tokenizer=str(tokenizer), output=str(out), sources={n: {"inputs": i} for n, i in inputs.items()},
                     **options)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every shard and of mix.json's splits (the rest of it names paths and workers)."""
    hashes = {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.glob("*/*.bin"))}
    splits = json.loads((out / "mix.json").read_text())["splits"]
    hashes["mix.json:splits"] = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("created", "seconds", "llamaworks_version", "tokenizer"):
        manifest.pop(k)
    hashes["manifest.json"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    tok = build_tokenizer(root / "tok.model")
    if sha256(tok.path) != GOLDEN_TOKENIZER:
        pytest.skip(f"this sentencepiece trains another model ({sha256(tok.path)}); the golden hashes are for "
                    f"{GOLDEN_TOKENIZER}: regenerate them with the reference mixer")
    return build_corpus(root / "corpus"), tok.path


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("workers, window, cache_shard", [(1, None, None), (2, 3000, 7001)])
def test_mix_bytes_equal_the_golden(text_kernels, golden_inputs, tmp_path, monkeypatch, case, workers, window,
                                    cache_shard):
    inputs, tok = golden_inputs
    # The tokenising workers (spawned, kept across mixes) take the same path: new ones, told by the environment.
    monkeypatch.setenv("LLAMAWORKS_NATIVE", "1" if text_kernels == "compiled" else "0")
    shards._drop_pool()
    if window:  # many interleaving windows: the output must not depend on them
        monkeypatch.setattr(mixmod, "_WINDOW_TOKENS", window)
    if cache_shard:  # token caches in many files, documents straddling them: nor on these
        monkeypatch.setattr(mixmod, "_CACHE_SHARD_TOKENS", cache_shard)
    cfg = config(case, inputs, tok, tmp_path / "out")
    cfg.workers = workers
    try:
        mix(cfg, progress=False)
    finally:
        shards._drop_pool()
    assert output_hashes(tmp_path / "out") == GOLDEN[case]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer(tmp / "tok.model")
        inputs = build_corpus(tmp / "corpus")
        print(f'GOLDEN_TOKENIZER = "{sha256(tok.path)}"')
        golden = {}
        for case in CASES:
            mix(config(case, inputs, tok.path, tmp / case), progress=False)
            golden[case] = output_hashes(tmp / case)
        print("GOLDEN: dict[str, dict[str, str]] = " + json.dumps(golden, indent=4))
