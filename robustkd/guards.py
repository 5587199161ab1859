"""Checks on data where it enters, each failing with one line that names the problem and the fix.

* :func:`check_parquet_files` reads each parquet file's footer (``pyarrow.parquet.read_metadata``)
  before a data set is built from it: a truncated or corrupt file, or a split with no rows, is named
  here instead of surfacing as a ``DatasetGenerationError`` from ``datasets``.
* :func:`check_split_rows` refuses a loaded split with no rows (CSV/JSON, the hub).
* :func:`check_train_batches` tells a training split too small for one batch apart from an empty
  one: under ``drop_last`` fewer examples than ``--batch-size`` give no batch at all.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file or split that cannot be used as it is; the message names the file and the fix."""


def check_parquet_files(files: Sequence[str | Path], split: str, root: str | Path) -> int:
    """Read each parquet file's footer; refuse a corrupt file or a split of no rows. Returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    for f in files:
        try:
            rows += pq.read_metadata(str(f)).num_rows
        except (pa.ArrowException, OSError) as exc:
            cause = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise DataFileError(f"{f} is not a readable parquet file ({cause}): it is truncated or corrupt. Copy or "
                                f"export it again, or remove it from {root}") from None
    if rows == 0:
        raise empty_split(split, root, files)
    return rows


def empty_split(split: str, root: str | Path, files: Sequence[str | Path] = ()) -> DataFileError:
    names = f" ({', '.join(Path(f).name for f in files)})" if files else ""
    need = "training needs examples" if split == "train" else "the evaluation needs examples"
    return DataFileError(f"the {split!r} split in {root}{names} has no rows: {need}. Put the examples in it, or point "
                         "--data-dir at the full data set")


def check_split_rows(ds: Any, split: str, root: str | Path, files: Sequence[str | Path] = ()) -> None:
    """Refuse a loaded split (anything with ``len``) of no rows."""
    if len(ds) == 0:
        raise empty_split(split, root, files)


def check_train_batches(n_examples: int, batch_size: int, drop_last: bool) -> None:
    """Refuse a training loader that gives no batch, naming the cause: no examples, or fewer examples
    than ``batch_size`` while the last partial batch is dropped (``drop_last``, every ADR preset).

    The trainer calls it with ``len(train_loader.dataset)`` before any work."""
    if n_examples == 0:
        raise DataFileError("the training split is empty: check --data-dir and --max-train-samples")
    if drop_last and n_examples < batch_size:
        raise DataFileError(f"the {n_examples} training examples make no full batch of --batch-size {batch_size}, and "
                            "the last partial batch is dropped (drop_last, set by ADR's presets), so training would "
                            f"have no batch: use --batch-size {n_examples} or less, --max-train-samples {batch_size} or "
                            "more, or --drop-last false")
