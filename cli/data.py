"""The data commands: ``fedmtl data prepare|partition|validate`` (the DVC stages) and
``fedmtl check``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.app import ParamsOpt, SetOpt, VerboseOpt, _config, _fail, app, console, data_app, err
from fedmtl import quiet


@contextmanager
def _data_warnings() -> Iterator[None]:
    """Print the data stages' DataWarnings (what validation will quarantine, odd client ids)
    as ``warning:`` lines; other warnings go on as usual."""
    import warnings

    from rich.markup import escape

    from fedmtl.data.sources import DataWarning

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            yield
    finally:
        for w in caught:
            if issubclass(w.category, DataWarning):
                err.print(f"[bold yellow]warning:[/] {escape(str(w.message))}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@data_app.command("prepare")
def data_prepare(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Load the configured source (digits, synthetic, your table) into data/raw/."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data import DataError, prepare

    try:
        with _data_warnings():
            path = prepare(cfg.data)
    except (DataError, FileNotFoundError) as exc:
        _fail(exc, 2)
    console.print(f"prepared [bold]{cfg.data.source}[/] data in {path}")


@data_app.command("partition")
def data_partition(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Split the prepared data into one Parquet file per client (train + held-out test)."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data import DataError, partition

    try:
        with _data_warnings():
            manifest = partition(cfg.data)
    except (DataError, FileNotFoundError) as exc:
        _fail(exc, 2)
    console.print(
        f"wrote {len(manifest.clients)} client partitions ({manifest.scheme}) to "
        f"{cfg.data.partitions_dir}"
    )


@data_app.command("validate")
def data_validate(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, verbose: VerboseOpt = False
) -> None:
    """Run the Great Expectations suite on every partition; quarantine the ones that fail."""
    cfg = _config(params, set_)
    quiet.configure(verbose)
    from fedmtl.data.manifest import read_manifest
    from fedmtl.data.validation import validate_partitions

    try:
        manifest = read_manifest(cfg.data.partitions_dir)
    except FileNotFoundError as exc:
        _fail(exc, 2)
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a manifest's fields
        _fail(
            ValueError(
                f"'{Path(cfg.data.partitions_dir) / 'manifest.json'}' is not a valid manifest "
                f"({type(exc).__name__}: {exc}): run `fedmtl data partition` again"
            ),
            2,
        )
    report = validate_partitions(
        cfg.data.partitions_dir, manifest, cfg.validation, cfg.data.validation_dir
    )
    console.print(
        f"validated {len(report.clients)} partitions: {len(report.passed)} passed, "
        f"{len(report.quarantined)} quarantined (report: {cfg.data.validation_dir}/report.json)"
    )
    for client, reasons in report.quarantined.items():
        console.print(f"  [yellow]quarantined[/] {client}: {reasons[0]}")


@app.command("check")
def check(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Load and check the settings as every command does, touching nothing (`make run` runs it
    before `dvc repro`): a bad setting fails here (exit 2) with the message the stages give."""
    cfg = _config(params, set_)
    where = f"'{params}'" if params.exists() else f"no '{params}': the defaults"
    console.print(
        f"settings ok ({where}; data.source={cfg.data.source}, "
        f"training.rounds={cfg.training.rounds}, algorithm.method={cfg.algorithm.method})",
        highlight=False,
    )
