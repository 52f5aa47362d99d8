"""Validate partition files against the data contract with Great Expectations (GX Core 1.x).

Every client in the manifest is checked in one ephemeral GX Data Context:

- a **contract** suite, run once per partition (one dataframe asset and validation definition
  per client): the contract's columns and no others, each column's dtype, ``client`` equal to
  the file's client, and at least ``min_train_rows`` / ``min_test_rows`` rows per split;
- a **values** suite, run once over one batch holding every partition whose columns and dtypes
  passed: no nulls anywhere, features finite (inside ``Manifest.feature_range`` when declared),
  ``split`` in {train, test}, ``row`` >= 0, classification labels in the declared classes and
  regression labels finite. Each row of that batch is labelled ``<client>#<position>``, so every
  unexpected value GX reports is traced back to its client and file position.

Running the per-value checks once over all partitions instead of once per partition keeps
the whole validation to a few seconds: GX's cost is per expectation, not per row.

A client fails when its file is missing or unreadable (or a symbolic link leaving the
partitions folder) or when any expectation fails; failed clients are *quarantined*: recorded in
``report.json`` so that training skips them. Partition files are only read, never moved or
rewritten. ``<out_dir>/data_docs/`` holds GX's Data Docs site for the run.

Validation is bound to what trains: the report records the SHA-256 and size of every file it
read (of the very bytes it validated) and the SHA-256 of the manifest it validated against.
:func:`bind_partitions` (the training flow, before its first round) refuses a manifest changed
since, and quarantines every client whose file is no longer the one validated; the digests go
to :class:`fedmtl.federation.Federation`, whose every read of a partition checks them again
(:func:`fedmtl.client.data.load_client_data`), so a file changed mid-run is caught too.

Great Expectations is imported lazily (it takes seconds), so importing this package is cheap.

The modules: :mod:`.report` (the report, reading it back, binding training to the validated
digests, the usable clients), :mod:`.expectations` (the contract's column kinds and the wording
of failed checks), :mod:`.gx` (the GX suites and their run) and :mod:`.run`
(:func:`validate_partitions`: reading the files, writing the report and the Data Docs). This
package re-exports their public names.
"""

from __future__ import annotations

from fedmtl.data.validation.expectations import FINITE_MAX, FLOAT_TYPES, INT_TYPES, STRING_COLUMNS
from fedmtl.data.validation.report import (
    CHANGED_CHECK,
    DATA_DOCS,
    READ_CHECK,
    REPORT,
    ClientValidation,
    ValidationReport,
    bind_partitions,
    manifest_digest,
    read_report,
    usable_clients,
)
from fedmtl.data.validation.run import _read_partition, validate_partitions

__all__ = [
    "CHANGED_CHECK",
    "DATA_DOCS",
    "FINITE_MAX",
    "FLOAT_TYPES",
    "INT_TYPES",
    "READ_CHECK",
    "REPORT",
    "STRING_COLUMNS",
    "ClientValidation",
    "ValidationReport",
    "_read_partition",
    "bind_partitions",
    "manifest_digest",
    "read_report",
    "usable_clients",
    "validate_partitions",
]
