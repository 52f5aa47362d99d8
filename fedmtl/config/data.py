"""The ``data`` section: the source (digits, synthetic, the user's table, HAR, Heart Disease),
how it is split into clients, and where the data's stages write."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmtl.config.sections import _Section

#: ``heart`` has no section of its own: FLamby's Fed-Heart-Disease is fixed (its four hospitals,
#: its split), which is what makes its results comparable with FLamby's.
Source = Literal["digits", "synthetic", "table", "har", "heart"]
Scheme = Literal["iid", "dirichlet", "shards", "label-permutation", "rotation"]
TaskKind = Literal["classification", "regression"]
HarWindows = Literal["segment", "session"]


class PartitionConfig(_Section):
    """How the prepared data set is split into clients (only for the built-in sources)."""

    scheme: Scheme = "label-permutation"
    n_clients: int = Field(20, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (scheme=dirichlet)")
    shards_per_client: int = Field(2, ge=1, description="classes per client (scheme=shards)")
    n_groups: int = Field(
        4, ge=1, description="groups (scheme=label-permutation: any; rotation: 1..4)"
    )
    missing_tasks: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of the clients that hold no labels of each task after the first "
        "(drawn per task with data.seed; the first task is never missing): clients that differ "
        "in their tasks (any source with several tasks, e.g. synthetic n_tasks, har's "
        "is_transition)",
    )


class SyntheticConfig(_Section):
    """FedProx's Synthetic(alpha, beta) generator (Li et al. 2020)."""

    alpha: float = Field(0.5, ge=0)
    beta: float = Field(0.5, ge=0)
    n_clients: int = Field(30, ge=1)
    n_features: int = Field(60, ge=1)
    n_classes: int = Field(10, ge=2)
    size_scale: float = Field(1.0, gt=0, description="multiplies each client's lognormal size")
    n_tasks: int = Field(
        1, ge=1, le=4, description="label columns: label, then label_1 (binary), label_2, ..."
    )


class TableConfig(_Section):
    """The user's own CSV or Parquet file: one row per example, a column naming its client."""

    path: str | None = None
    client_column: str = "client"
    label_columns: list[str] = Field(default_factory=lambda: ["label"], min_length=1)
    group_column: str | None = None
    feature_columns: list[str] | None = Field(
        None, description="default: every other numeric column"
    )
    task_kinds: dict[str, TaskKind] = Field(
        default_factory=dict, description="per label column; default classification"
    )


class HarConfig(_Section):
    """UCI HAPT smartphone recordings (``pip install 'fedmtl[har]'``): one client per user."""

    window: int = Field(128, ge=8, description="samples per window (50 Hz: 128 = 2.56 s)")
    overlap: float = Field(0.5, ge=0, lt=1, description="overlap of consecutive windows")
    windows: HarWindows = Field(
        "segment",
        description="segment: inside each labelled activity segment (HAPT's own windows); "
        "session: across the whole session, labelled by majority",
    )
    transition_task: bool = Field(True, description="add the is_transition task")
    max_users: int | None = Field(None, ge=1, description="keep only the first N users")


class DataConfig(_Section):
    source: Source = "digits"
    seed: int = 0
    test_fraction: float = Field(0.25, gt=0, lt=1)
    raw_dir: str = "data/raw"
    partitions_dir: str = "data/partitions"
    validation_dir: str = "data/validation"
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    table: TableConfig = Field(default_factory=TableConfig)
    har: HarConfig = Field(default_factory=HarConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "table" and not self.table.path:
            raise ValueError("data.table.path must be set when data.source is 'table'")
        if self.partition.scheme == "rotation" and self.partition.n_groups > 4:
            raise ValueError("data.partition.n_groups must be 1..4 for scheme 'rotation'")
        return self
