"""Partitioned dedup with its input, output and partition files in an S3 bucket (moto's server)."""

from __future__ import annotations

import pytest

from llamaworks.data.executor import JsonlReader, LocalExecutor

from .test_dedup_partitioned import PIPELINES, outputs, without_partitioned, write_corpus
from .test_storage import _download, _outputs, _upload, s3  # noqa: F401  (s3: the server fixture)


@pytest.mark.slow  # ~40 s: moto's server answers each of the many small partition files slowly
def test_partitioned_dedup_from_s3_to_s3_equals_the_local_single_process_run(tmp_path, s3):  # noqa: F811
    write_corpus(tmp_path / "in", n_files=2, per_file=20)
    ref = LocalExecutor(tmp_path / "ref", workers=1, keep_excluded=True, progress=False).run(
        "web", JsonlReader(), PIPELINES["all"](), [tmp_path / "in"])
    bucket = s3()
    _upload(tmp_path / "in", f"{bucket}/in")
    stats = LocalExecutor(f"{bucket}/out", workers=2, keep_excluded=True, progress=False, dedup_partitions=3).run(
        "web", JsonlReader(), PIPELINES["all"](), [f"{bucket}/in"])
    assert without_partitioned(stats) == ref
    got = _download(f"{bucket}/out")
    assert any(k.startswith(".state/stage3/reduce/") for k in got)  # the partition files live in the bucket
    published = {k: v for k, v in _outputs(got).items() if k.endswith(".jsonl.gz")}
    assert published == outputs(tmp_path / "ref")
