"""Observability of data runs: the rolling documents/s and bytes/s line, the Dask dashboard
link, and the data card's removals per step and per source with examples of each reason."""

from __future__ import annotations

import json
import logging

import pytest

from llamaworks.data.document import Document, ShardWriter
from llamaworks.data.executor import EXAMPLE_CHARS, JsonlReader, LocalExecutor, Throughput, _merge, data_card
from llamaworks.data.step import Filter, LineCleaner


def test_throughput_is_a_rolling_rate_over_the_window():
    m = Throughput(window=10.0, start=0.0)
    assert m.rates(0.0) == (0.0, 0.0)
    m.add(2.0, 100, 1000)
    assert m.rates(4.0) == (25.0, 250.0)  # shorter than the window: since the start
    m.add(8.0, 300, 3000)
    assert m.rates(10.0) == (40.0, 400.0)
    assert m.rates(12.5) == (30.0, 300.0)  # the event at t=2 left the window (t - 10 = 2.5)
    assert m.rates(30.0) == (0.0, 0.0)
    m.add(29.0, 10, 2_000_000)
    assert m.line(30.0) == "1.0 docs/s, 0.20 MB/s (last 10 s)"
    assert Throughput(60.0, start=0.0).line(2.5) == "0.0 docs/s, 0.00 kB/s (last 2.5 s)"


class DropShort(Filter):
    name = "drop_short"

    def reason(self, doc):
        return "shorter than 20 characters" if len(doc.text) < 20 else None


class NoShouting(LineCleaner):
    name = "no_shouting"

    def clean(self, doc):
        lines = doc.text.split("\n")
        loud = [x for x in lines if x.isupper()]
        return "\n".join(x for x in lines if not x.isupper()), {"an all-caps line": loud}


def _write(folder, shards):
    for n, docs in enumerate(shards):
        with ShardWriter(folder / f"{n}.jsonl.gz") as w:
            for d in docs:
                w.write(d)


def test_the_card_names_each_removal_reason_with_examples(tmp_path):
    long = "x" * 500
    shards = [
        [Document("a1", "tiny", "wiki"), Document("a2", "A fine line of text here.\nBUY NOW\nmore text", "wiki"),
         Document("a3", f"short?\n{long}", "books"), Document("a4", "no", "books")],
        [Document("b1", "small", "books"), Document("b2", "ALL CAPS, NOTHING ELSE", "wiki"),
         Document("b3", "Another fine paragraph.\nCLICK HERE", "wiki"), Document("b4", "hi", "wiki")],
    ]
    _write(tmp_path / "in", shards)
    stats = LocalExecutor(tmp_path / "out", workers=2, progress=False, card_examples=2).run(
        "mixed", JsonlReader(), [DropShort(), NoShouting()], [tmp_path / "in"])
    short, shout = stats["steps"]
    # two examples of four drops, in shard order (shard 0's first), each the document's id and start
    assert short["examples"]["shorter than 20 characters"] == [
        {"id": "a1", "kind": "document", "text": "tiny"}, {"id": "a4", "kind": "document", "text": "no"}]
    assert short["dropped_by_source"] == {"wiki": {"shorter than 20 characters": 2},
                                          "books": {"shorter than 20 characters": 2}}
    # line removals: the removed line itself; a page that loses every line is dropped with its own reason
    assert shout["examples"]["an all-caps line"] == [{"id": "a2", "kind": "line", "text": "BUY NOW"},
                                                     {"id": "b2", "kind": "line", "text": "ALL CAPS, NOTHING ELSE"}]
    assert shout["examples"]["empty after cleaning"] == [
        {"id": "b2", "kind": "document", "text": "ALL CAPS, NOTHING ELSE"}]
    card = (tmp_path / "out" / "DATACARD.md").read_text()
    assert "- dropped 4 documents (13 characters): shorter than 20 characters" in card
    assert '  - `a1`, the document starts: "tiny"' in card
    assert '  - `a2`, a removed line: "BUY NOW"' in card
    assert "Dropped documents by document source:" in card
    assert "- books: 2 (shorter than 20 characters: 2)" in card
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["steps"][0]["examples"] == short["examples"]


def test_examples_are_cut_to_200_characters_and_quoted():
    long = "line one\n" + "y" * 400
    st = {"name": "s", "description": "d", "in": dict.fromkeys(("documents", "lines", "chars", "bytes"), 1),
          "kept": dict.fromkeys(("documents", "lines", "chars", "bytes"), 0),
          "dropped": {"why": {"documents": 1, "lines": 2, "chars": 409, "bytes": 409}}, "lines_removed": {},
          "examples": {"why": [{"id": "d`1", "kind": "document", "text": long[:EXAMPLE_CHARS]}]}}
    card = data_card({"source": "t", "read": {"documents": 1, "files": 1, "malformed": []}, "steps": [st]})
    (line,) = [x for x in card.splitlines() if x.startswith("  - ")]
    assert json.loads(line.split(": ", 1)[1]) == long[:200]  # one line: the newline is escaped
    assert EXAMPLE_CHARS == 200


def test_merge_keeps_the_first_examples_in_shard_order_and_reads_old_stats():
    zero = dict.fromkeys(("documents", "lines", "chars", "bytes"), 0)
    a = {"name": "s", "description": "d", "in": zero, "kept": zero, "dropped": {}, "lines_removed": {},
         "examples": {"r": [{"id": "1"}, {"id": "2"}]}, "dropped_by_source": {"x": {"r": 2}}}
    b = {"name": "s", "description": "d", "in": zero, "kept": zero, "dropped": {}, "lines_removed": {},
         "examples": {"r": [{"id": "3"}], "q": [{"id": "4"}]}, "dropped_by_source": {"x": {"r": 1}, "y": {"q": 1}}}
    m = _merge(a, b, 3)
    assert m["examples"] == {"r": [{"id": "1"}, {"id": "2"}, {"id": "3"}], "q": [{"id": "4"}]}
    assert m["dropped_by_source"] == {"x": {"r": 3}, "y": {"q": 1}}
    assert _merge(a, b, 2)["examples"]["r"] == [{"id": "1"}, {"id": "2"}]
    old = {k: v for k, v in a.items() if k not in ("examples", "dropped_by_source")}  # stats of an older run
    assert _merge(old, b, 3)["examples"] == b["examples"]


def test_the_executor_logs_a_rolling_throughput_line(tmp_path, caplog):
    _write(tmp_path / "in", [[Document(f"{s}-{i}", "é" * 10, "t") for i in range(5)] for s in range(3)])
    with caplog.at_level(logging.INFO, logger="llamaworks.data.executor"):
        LocalExecutor(tmp_path / "out", workers=1, progress=False).run("t", JsonlReader(), [], [tmp_path / "in"])
    lines = [r.getMessage() for r in caplog.records if "docs/s" in r.getMessage()]
    assert len(lines) == 3 and lines[-1].startswith("stage 0: 3/3 shards, ")
    assert "kB/s" in lines[-1] or "MB/s" in lines[-1]


def test_a_negative_number_of_examples_is_refused(tmp_path):
    with pytest.raises(ValueError, match="card_examples"):
        LocalExecutor(tmp_path / "out", card_examples=-1)


def test_the_dask_executor_prints_its_dashboard_link(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    from llamaworks.data.cluster import DaskExecutor

    _write(tmp_path / "in", [[Document("a", "some text", "t")]])
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        DaskExecutor(tmp_path / "out", client, progress=False).run("t", JsonlReader(), [], [tmp_path / "in"])
        link = client.dashboard_link
    err = capsys.readouterr().err
    assert f"Dask dashboard: {link}" in err
