"""The block-table width policy of the engine's eager passes (serve/engine.py table_width)."""

from __future__ import annotations

import pytest

from llamaworks.serve.engine import WIDTH_STEP, table_width


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 5, 64, 68, 69, 127, 128, 129])
def test_width_covers_the_longest_sequence_with_less_than_a_step_to_spare(blocks):
    w = table_width(blocks, max_blocks=1000, compiled=False)
    assert blocks <= w < blocks + WIDTH_STEP and w % WIDTH_STEP == 0


def test_width_is_capped_by_the_context():
    assert table_width(69, max_blocks=70, compiled=False) == 70
    assert table_width(70, max_blocks=70, compiled=False) == 70


def test_compiled_steps_read_the_whole_context():
    assert table_width(3, max_blocks=130, compiled=True) == 130


def test_a_1k_prompt_gathers_far_fewer_blocks_than_a_power_of_two():
    # 1,100 tokens in 16-token blocks: 69 blocks; a power of two would be 128.
    assert table_width(69, max_blocks=256, compiled=False) == 72
    assert table_width(0, max_blocks=256, compiled=False) == WIDTH_STEP
