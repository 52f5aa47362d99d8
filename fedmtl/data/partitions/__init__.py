"""The two data stages: ``prepare`` (source -> raw data) and ``partition`` (raw -> clients).

- :func:`prepare` loads ``data.source`` and writes ``<raw_dir>/raw.parquet`` (the rows, in
  order; a row's position is its ``row`` id) and ``<raw_dir>/schema.json`` (what the rows are).
- :func:`partition` reads them (never writes them), splits the rows into clients (the
  source's own clients, else ``data.partition.scheme``), splits each client's rows into
  ``train``/``test`` (or keeps the source's own split: ``heart``'s, FLamby's) and writes one Parquet file per client plus ``manifest.json`` to
  ``partitions_dir`` (the contract of :mod:`fedmtl.data.manifest`).
- :func:`load_partition` reads one client's file back.

Every file is written atomically (temporary file, then rename); :func:`partition` makes every
file's bytes before it replaces any earlier partition, so a failure leaves the old set whole.

The modules: :mod:`.prepared` (the first stage and reading its output back), :mod:`.clients`
(splitting rows into clients and each client's rows into train/test, the clients' file names)
and :mod:`.files` (writing the partition files and their manifest, reading one back). This
package re-exports their public names.
"""

from __future__ import annotations

from fedmtl.data.partitions.clients import partition_file_name, train_test_rows
from fedmtl.data.partitions.files import NATURAL, load_partition, partition
from fedmtl.data.partitions.prepared import RAW_FILE, SCHEMA_FILE, load_prepared, prepare

__all__ = [
    "NATURAL",
    "RAW_FILE",
    "SCHEMA_FILE",
    "load_partition",
    "load_prepared",
    "partition",
    "partition_file_name",
    "prepare",
    "train_test_rows",
]
