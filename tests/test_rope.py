"""rope.py's positions of packed examples (the frequencies and rotation are tested in
tests/test_model.py and tests/test_model_family.py)."""

from __future__ import annotations

import torch

from llamaworks.rope import document_positions


def test_positions_restart_at_each_document_and_runs_count_them():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2],
                            [5, 5, 5, 5, 5, 5, 5, 5, 5],
                            [3, 1, 1, 3, 3, 3, 0, 1, 1]])  # ids repeat: a change starts a new document
    run, pos = document_positions(doc_ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3],
                            [0, 1, 2, 3, 4, 5, 6, 7, 8],
                            [0, 0, 1, 0, 1, 2, 0, 0, 1]]
    assert run.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2],
                            [0, 0, 0, 0, 0, 0, 0, 0, 0],
                            [0, 1, 1, 2, 2, 2, 3, 4, 4]]
    assert pos.dtype == run.dtype == torch.int64


def test_a_single_token_row():
    run, pos = document_positions(torch.tensor([[9]]))
    assert run.tolist() == [[0]] and pos.tolist() == [[0]]
