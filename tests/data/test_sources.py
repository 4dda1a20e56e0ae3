"""The source table (data/sources.py) drives `llamaworks data run`: its choices, its help, its pipelines."""

from __future__ import annotations

import inspect

import pytest

from llamaworks.cli import main
from llamaworks.data.command import run_command
from llamaworks.data.executor import Reader
from llamaworks.data.mix import TABLE1_WEIGHTS, canonical_source
from llamaworks.data.sources import SOURCES, get_source, pipeline
from llamaworks.data.step import Step


def test_every_source_is_a_choice_and_listed_in_the_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["data", "run", "--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    assert "{" + ",".join(SOURCES) + "}" in help_text  # the positional's choices, in the table's order
    for name, s in SOURCES.items():
        assert f"  {name} " in help_text and s.help.split()[0] in help_text
        assert all("--" + o.replace("_", "-") in help_text for o in s.options)


def test_an_unknown_source_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["data", "run", "nope", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(name in err for name in SOURCES)
    with pytest.raises(ValueError, match=r"unknown source 'nope'; choose one of commoncrawl, books"):
        pipeline("nope")
    with pytest.raises(ValueError, match="unknown source"):
        run_command(source="nope", input=[str(tmp_path)], output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_options_a_source_lists_are_options_of_data_run():
    params = set(inspect.signature(run_command).parameters)
    for s in SOURCES.values():
        assert set(s.options) <= params, s.name


def test_every_table1_row_has_one_source():
    rows = [canonical_source(s.table1) for s in SOURCES.values() if s.table1 is not None]
    assert sorted(rows) == sorted(TABLE1_WEIGHTS)


@pytest.mark.parametrize("name", [n for n in SOURCES if n != "commoncrawl"])
def test_each_pipeline_builds_with_the_defaults(name):
    reader, steps = pipeline(name)
    assert isinstance(reader, Reader) and all(isinstance(s, Step) for s in steps)
    assert type(reader) is type(get_source(name).reader())


def test_commoncrawl_needs_its_models():
    with pytest.raises(ValueError, match="--lid-model"):
        pipeline("commoncrawl")


def test_options_reach_the_steps():
    _, steps = pipeline("books", dedup_threshold=0.7)
    assert steps[-1].threshold == 0.7
    _, steps = pipeline("stackexchange", sites=["math.stackexchange.com"])
    assert steps[0].sites == ("math.stackexchange.com",)
