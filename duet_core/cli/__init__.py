"""duet's command line: one typer app per command group, combined in :mod:`duet_core.cli.main`."""
