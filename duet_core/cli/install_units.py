"""``duet install-units``: systemd units (nightly run, watch service) or a cron file, for running duet unattended."""

from __future__ import annotations

import os
import shutil
import sys

import typer

from duet_core import systemd
from duet_core.config import DEFAULT_PATH
from duet_core.errors import DuetError


def _this_duet() -> str:
    """The duet executable to put in the units: the one running now if it is the ``duet`` script, else the one on
    PATH; never a guess."""
    me = os.path.abspath(sys.argv[0])
    if os.path.basename(me) == "duet" and os.access(me, os.X_OK):
        return me
    found = shutil.which("duet")
    if not found:
        raise DuetError("cannot tell which duet executable the units should run", hint="give it with --duet PATH")
    return os.path.abspath(found)


def install_units(
    directory: str = typer.Option(systemd.DEFAULT_UNIT_DIR, "--dir", help="Where to write the unit files."),
    duet: str = typer.Option(None, "--duet", help="The duet executable the units run (default: this one)."),
    config: str = typer.Option(DEFAULT_PATH, "--config", help="The config file the units run with."),
    metrics_dir: str = typer.Option(None, "--metrics-dir", help="node_exporter textfile directory for *.prom."),
    on_calendar: str = typer.Option(systemd.DEFAULT_ON_CALENDAR, "--on-calendar",
                                    help="When the nightly run starts (systemd calendar event; ±1h spread)."),
    at: str = typer.Option("02:30", "--at", help="With --cron: the time of the nightly run (HH:MM)."),
    print_only: bool = typer.Option(False, "--print", help="Print the files instead of writing them."),
    cron: bool = typer.Option(False, "--cron", help="The /etc/cron.d/duet file instead of systemd units (printed "
                              "with --print, else written to --dir, e.g. --dir /etc/cron.d)."),
    force: bool = typer.Option(False, "--force", help="Replace files that exist with other content."),
) -> None:
    """Install systemd units for unattended runs: duet.service + duet.timer (nightly duet run from the config) and
    duet-watch@.service (duet watch of one scope, with reload and clean stop); or a cron file.

    Nothing is enabled: the command prints what to run next. Files that exist with other content are kept unless
    --force. docs/operations.md explains every line.

    Examples:
      duet install-units && systemctl daemon-reload && systemctl enable --now duet.timer
      duet install-units --metrics-dir /var/lib/prometheus/node-exporter --on-calendar '*-*-* 03:00'
      systemctl enable --now duet-watch@$(systemd-escape -p /srv).service
      duet install-units --cron --print
      duet install-units --cron --dir /etc/cron.d
    """
    duet = duet or _this_duet()
    if cron:
        files = {"duet": systemd.render_cron(duet, config, metrics_dir, at)}
    else:
        files = systemd.render(duet, config, metrics_dir, on_calendar)
    if print_only:
        for name, text in files.items():
            if len(files) > 1:
                print(f"### {name}")
            sys.stdout.write(text)
        return
    if cron and directory == systemd.DEFAULT_UNIT_DIR:
        directory = "/etc/cron.d"
    for path in systemd.install(files, directory, force=force):
        print(f"wrote {path}")
    if not cron:
        print("next: systemctl daemon-reload && systemctl enable --now duet.timer\n"
              "      systemctl enable --now duet-watch@$(systemd-escape -p /srv).service   # optional, per scope")
