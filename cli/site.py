"""``fedmtl site``: a client as a site on its own machine (issue 18, in progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.app import _fail, app, console

site_app = typer.Typer(
    help="A site: a client on its own machine, its data never leaving it (issue 18, in progress).",
    no_args_is_help=True,
)
app.add_typer(site_app, name="site")


@site_app.command("init")
def init(
    site: Annotated[str, typer.Option("--site", help="the site's name (its client id)")],
    partitions: Annotated[
        Path, typer.Option("--partitions", help="the site's own validated partition folder")
    ],
    exchange: Annotated[
        str,
        typer.Option("--exchange", help="the exchange store's URL (fsspec: a folder, s3://...)"),
    ],
    coordinator_key: Annotated[
        Path,
        typer.Option("--coordinator-key", help="the coordinator's public key (coordinator.pub)"),
    ],
    folder: Annotated[Path, typer.Option("--dir", help="the site's folder (created, mode 0700)")],
) -> None:
    """Create the site's folder: its key pair, the coordinator's key, its settings."""
    from fedmtl.sites.identity import IdentityError
    from fedmtl.sites.site import SiteError, init_site

    try:
        root = init_site(folder, site, partitions, exchange, coordinator_key)
    except (SiteError, IdentityError, OSError) as exc:
        _fail(exc, 2)
    console.print(
        f"site '{site}' ready in {root}; give the coordinator {root / 'keys' / (site + '.pub')}"
    )


@site_app.command("coordinator-key")
def coordinator_key(
    folder: Annotated[Path, typer.Option("--dir", help="the coordinator's key folder")],
) -> None:
    """Create the coordinator's key pair (once); sites trust its public key."""
    from fedmtl.sites.identity import COORDINATOR, Identity, IdentityError

    try:
        _, public = Identity.generate(COORDINATOR).save(folder)
    except IdentityError as exc:
        _fail(exc, 2)
    console.print(f"give every site {public}")


@site_app.command("serve")
def serve(
    folder: Annotated[Path, typer.Option("--dir", help="the site's folder")],
) -> None:
    """Serve this site's deployment fedmtl-site/NAME: the coordinator's rounds run here."""
    from fedmtl.sites.site import SiteError, read_site

    try:
        read_site(folder)
    except SiteError as exc:
        _fail(exc, 2)
    from flows.sites import serve_site

    serve_site(folder)
