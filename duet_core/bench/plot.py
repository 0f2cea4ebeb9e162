"""``--plot out.png`` for the maintenance benches: grouped bars, one panel per measure, readable at a glance.

Each bench describes its figure as panels (device bytes read, wall time, ...), each a set of groups (a task, a
scenario) of bars (baseline, duet, a peer tool). matplotlib runs with the Agg backend: no display needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# One colour per kind of bar, the same in every figure: what duet replaces is grey, duet is blue.
COLORS = {"alone": "#9e9e9e", "peer": "#bdbdbd", "at the same time": "#1f77b4", "duet": "#1f77b4",
          "duet alone": "#6baed6", "duet together": "#08519c", "target": "#d62728"}


@dataclass
class Panel:
    title: str
    ylabel: str
    groups: dict[str, dict[str, float]]          # group label -> {bar label: value}
    lines: dict[str, float] = field(default_factory=dict)   # horizontal reference lines: label -> value


def _color(label: str, i: int) -> str:
    for key in sorted(COLORS, key=len, reverse=True):
        if label.startswith(key):
            return COLORS[key]
    return f"C{i}"


def _short(value: float) -> str:
    """A bar's label: three significant digits, never in exponent notation."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def plot(path: str, title: str, panels: list[Panel]) -> None:
    """Write ``panels`` side by side as a PNG at ``path`` (written to a temp file, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labels = list(dict.fromkeys(bar for bars in panel.groups.values() for bar in bars))
        width = 0.8 / max(len(bars) for bars in panel.groups.values())
        seen: set[str] = set()
        for g, bars in enumerate(panel.groups.values()):
            for i, (label, value) in enumerate(bars.items()):   # the bars a group has, centred on it
                x = g + (i - (len(bars) - 1) / 2) * width
                rect = ax.bar(x, value, width, color=_color(label, labels.index(label)), edgecolor="black",
                              linewidth=0.4, label=None if label in seen else label)
                ax.bar_label(rect, labels=[_short(value)], fontsize=7, padding=1)
                seen.add(label)
        for name, value in panel.lines.items():
            ax.axhline(value, color=COLORS["target"], linestyle="--", linewidth=1, label=name)
        ax.set_xticks(range(len(panel.groups)), list(panel.groups), fontsize=8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.ylabel)
        tallest = max([v for bars in panel.groups.values() for v in bars.values()] + list(panel.lines.values()))
        ax.set_ylim(0, 1.45 * tallest)   # room for the legend above the tallest bar
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def byte_unit(*values: float) -> tuple[str, int]:
    """MiB for small data sets, GiB from 2 GiB up: the unit that keeps the bar labels short."""
    return ("GiB", 1 << 30) if max(values) >= 2 << 30 else ("MiB", 1 << 20)


def together_panels(report: dict) -> list[Panel]:
    """Device reads and wall time: each task alone, their sum, and duet's one run of all four."""
    unit, scale = byte_unit(report["baseline_device_read_bytes"])
    alone = "alone, in turn"
    device = {f"{r['tasks'][0]}": {alone: r["device_read_bytes"] / scale} for r in report["baseline"]}
    device["all four"] = {alone: report["baseline_device_read_bytes"] / scale,
                          "duet together": report["duet_device_read_bytes"] / scale}
    wall = {f"{r['tasks'][0]}": {alone: r["wall_s"]} for r in report["baseline"]}
    wall["all four"] = {alone: report["baseline_wall_s"], "duet together": report["duet_wall_s"]}
    target = {"target: 1.05x data set": 1.05 * report["dataset_bytes"] / scale}
    return [Panel("device bytes read", unit, device, target),
            Panel("wall time", "seconds", wall,
                  {"target: 1.15x slowest alone": 1.15 * report["baseline_slowest_wall_s"]})]


def piggyback_panels(report: dict) -> list[Panel]:
    """The maintenance's own device reads, the foreground's throughput and the wall time: fio and duet one after
    the other against the two at the same time."""
    unit, scale = byte_unit(report["baseline_device_read_bytes"])
    alone, both = "alone, in turn", "at the same time"
    device = {"maintenance (duet)": {alone: report["maintenance_alone_read_bytes"] / scale,
                                     both: report["maintenance_read_bytes"] / scale},
              "foreground (fio)": {alone: report["fio_alone"]["process_read_bytes"] / scale,
                                   both: report["fio_with_duet"]["process_read_bytes"] / scale},
              "loop device, all": {alone: report["baseline_device_read_bytes"] / scale,
                                   both: report["duet_device_read_bytes"] / scale}}
    mb = 1e6
    throughput = {"fio": {alone: report["foreground_alone_bytes_per_s"] / mb,
                          both: report["foreground_with_duet_bytes_per_s"] / mb}}
    wall = {"fio + duet": {alone: report["baseline_wall_s"], both: report["duet_wall_s"]}}
    target = report["maintenance_target_ratio"] * report["dataset_bytes"] / scale
    return [Panel("device bytes read", unit, device, {"target for the maintenance: (1 - f) + 0.05": target}),
            Panel("foreground throughput", "MB/s", throughput,
                  {"target: 5% slower": 0.95 * report["foreground_alone_bytes_per_s"] / mb}),
            Panel("wall time", "seconds", wall)]


def peers_panels(report: dict) -> list[Panel]:
    """Per job: the peer tool and duet's task alone; for all four: the peers in turn, duet's tasks alone in turn,
    and duet's one run of the four."""
    unit, scale = byte_unit(report["baseline_device_read_bytes"], report["duet_alone_device_read_bytes"])
    peer, alone, together = "peer tool", "duet alone", "duet together"
    device: dict[str, dict[str, float]] = {}
    wall: dict[str, dict[str, float]] = {}
    for job, j in report["jobs"].items():
        name = f"{job}\n{j['peer']['argv'][0]} / {j['duet_task']}" if j["peer"] else f"{job}\n{j['duet_task']}"
        device[name] = ({peer: j["peer"]["device_read_bytes"] / scale} if j["peer"] else {}) | {
            alone: j["duet"]["device_read_bytes"] / scale}
        wall[name] = ({peer: j["peer"]["wall_s"]} if j["peer"] else {}) | {alone: j["duet"]["wall_s"]}
    device["all four\nin turn / one run"] = {peer: report["baseline_device_read_bytes"] / scale,
                                             alone: report["duet_alone_device_read_bytes"] / scale,
                                             together: report["duet_device_read_bytes"] / scale}
    wall["all four\nin turn / one run"] = {peer: report["baseline_wall_s"], alone: report["duet_alone_wall_s"],
                                           together: report["duet_wall_s"]}
    return [Panel("device bytes read", unit, device, {"data set": report["dataset_bytes"] / scale}),
            Panel("wall time", "seconds", wall)]
