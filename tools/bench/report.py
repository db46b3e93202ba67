"""Shared output of every `tierlite bench` subcommand: one results.json per output folder (a key
per benchmark, so several benchmarks can share a folder), a Markdown file per benchmark, PNG plots,
the machine description (cores, CPU model, date), latency percentiles, target checks, a progress
display and per-process CPU time read from /proc (no psutil needed).

Usage from a benchmark:
    rep = Report("accuracy", args.out, args)    # records the command line, machine, date
    rep.results["configs"] = [...]              # anything JSON-serialisable
    rep.add_markdown(markdown_table(COLUMNS, rows))
    rep.bar_plot("top1", labels, values, ylabel="top-1 %")
    rep.write()                                 # results.json (merged), accuracy.md, accuracy-*.png
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RESULTS_FILE = "results.json"
DEFAULT_DATA = "../shared/datasets/cifar10-jpeg/test"  # the labelled test folder beside the repo


# -- machine and command ------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    from tierlite import __version__

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tierlite": __version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how busy the machine was besides the benchmark."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(name: str, args: Any = None) -> str:
    """The command as a user would type it again: the process's own `tierlite bench <name> ...`
    when that is how it was started, else rebuilt from the parsed options (programmatic calls)."""
    argv = sys.argv[1:]
    if "bench" in argv and name in argv[argv.index("bench"):] or args is None:
        return "tierlite " + shlex.join(argv)
    parts = ["bench", name]
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "bench", "log_level", "log_format") or value in (None, False, []):
            continue
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            parts += [flag] if v is True else [flag, str(v)]
    return "tierlite " + shlex.join(parts)


# -- statistics -----------------------------------------------------------------------------
def latency_ms(seconds: Iterable[float]) -> dict[str, float | int | None]:
    """p50/p99/mean in milliseconds of durations given in seconds (None when there are none)."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "max_ms": float(a.max())}


@dataclass(frozen=True)
class Target:
    """A goal from the brief, checked against a measured value: 'met' or 'missed by X'."""
    name: str
    goal: float
    higher_is_better: bool
    unit: str = ""
    gap_unit: str | None = None  # unit of the shortfall if it differs (e.g. " pt" for a " %" goal)

    def check(self, value: float | None) -> dict[str, Any]:
        sign = ">=" if self.higher_is_better else "<="
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return {"target": self.name, "goal": f"{sign} {fmt_num(self.goal)}{self.unit}", "measured": None,
                    "met": False, "status": "not measured"}
        met = value >= self.goal if self.higher_is_better else value <= self.goal
        gap = abs(value - self.goal)
        return {"target": self.name, "goal": f"{sign} {fmt_num(self.goal)}{self.unit}", "measured": value,
                "met": bool(met),
                "status": "met" if met else f"missed by {fmt_num(gap)}{self.unit if self.gap_unit is None else self.gap_unit}"}


def fmt_num(x: Any, digits: int = 3) -> str:
    """Compact number for tables: 3 significant digits, thousands separators for big ones."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if np.isnan(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


Column = tuple[str, str, Callable[[Any], str] | None]  # key, header, formatter (default fmt_num)


def markdown_table(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as a GitHub Markdown table; a missing key prints as '–'."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join((f or fmt_num)(r.get(k)) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# -- progress ---------------------------------------------------------------------------------
class Progress:
    """One status line on stderr, redrawn at most every `every_s` seconds (a plain line per update
    when stderr is not a terminal, so CI logs stay short)."""

    def __init__(self, total: int, label: str, every_s: float = 2.0, stream=None, enabled: bool = True):
        self.total, self.label, self.every_s = max(int(total), 1), label, every_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = self._last = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                f"{rate:.0f}/s, {elapsed:.0f}s elapsed, eta {eta:.0f}s")
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def say(msg: str) -> None:
    """A progress message for the user (stderr, so stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


# -- CPU per process --------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds used so far by process `pid` (None if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of stat)


class CpuMeter:
    """CPU use of named processes over a window: start(), then stop() -> {name: percent of one core}."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self._t0: float = 0.0
        self._c0: dict[str, float | None] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def stop(self) -> dict[str, float | None]:
        wall = time.monotonic() - self._t0
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            c1, c0 = cpu_seconds(pid), self._c0.get(name)
            out[name] = None if c1 is None or c0 is None or wall <= 0 else 100.0 * (c1 - c0) / wall
        return out


# -- the report -------------------------------------------------------------------------------
class Report:
    """Collects one benchmark's results and writes them to `out_dir`."""

    def __init__(self, name: str, out_dir: str | Path, args: Any = None):
        self.name = name
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.command = command_line(name, args)
        self.machine = machine_info()
        self.results: dict[str, Any] = {}
        self.markdown: list[str] = []
        self.plots: list[str] = []

    def add_markdown(self, text: str) -> None:
        self.markdown.append(text.rstrip() + "\n")

    def plot_path(self, stem: str) -> Path:
        return self.out_dir / f"{self.name}-{stem}.png"

    def header(self) -> str:
        m = self.machine
        load = "/".join(f"{x:g}" for x in m.get("load_average_at_start") or [])
        return (f"Command: `{self.command}`  \n"
                f"Machine: {m['cores']} cores, {m['cpu_model']}; Python {m['python']}, tierlite {m['tierlite']}; "
                f"load average at start {load or 'n/a'} (1/5/15 min)  \n"
                f"Date: {m['date']}\n")

    def write(self) -> dict[str, Path]:
        """Merge this benchmark into results.json and write <name>.md; returns the paths."""
        res_path = self.out_dir / RESULTS_FILE
        try:
            merged = json.loads(res_path.read_text()) if res_path.exists() else {}
        except json.JSONDecodeError:
            merged = {}
        self.machine["load_average_at_end"] = load_average()
        merged[self.name] = {"command": self.command, "machine": self.machine, "results": self.results,
                             "plots": self.plots}
        res_path.write_text(json.dumps(merged, indent=2, default=_json_default) + "\n")
        md_path = self.out_dir / f"{self.name}.md"
        plots = "".join(f"\n![{p}]({p})\n" for p in self.plots)
        md_path.write_text(f"## {self.name}\n\n{self.header()}\n" + "\n".join(self.markdown) + plots)
        return {"results": res_path, "markdown": md_path}

    # -- plots (matplotlib imported lazily; headless backend) ---------------------------------
    def bar_plot(self, stem: str, labels: Sequence[str], values: Sequence[float | None], ylabel: str,
                 title: str, log: bool = False, hline: float | None = None) -> Path | None:
        plt = _pyplot()
        if plt is None:
            return None
        vals = [np.nan if v is None else float(v) for v in values]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
        ax.bar(range(len(labels)), vals, color="#4878a8")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if hline is not None:
            ax.axhline(hline, color="#c44", linestyle="--", linewidth=1, label=f"target {fmt_num(hline)}")
            ax.legend(fontsize=8)
        for i, v in enumerate(vals):
            if not np.isnan(v):
                ax.text(i, v, fmt_num(v), ha="center", va="bottom", fontsize=7)
        return self._save(fig, stem)

    def line_plot(self, stem: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                  ylabel: str, title: str, hline: float | None = None, logy: bool = False,
                  annotate: dict[str, Sequence[str]] | None = None) -> Path | None:
        plt = _pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, (xs, ys) in series.items():
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=name)
            for x, y, text in zip(xs, ys, (annotate or {}).get(name, [])):
                if y is not None:
                    ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if hline is not None:
            ax.axhline(hline, color="#c44", linestyle="--", linewidth=1, label=f"{fmt_num(hline)}")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return self._save(fig, stem)

    def scatter_plot(self, stem: str, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str,
                     title: str, logx: bool = False) -> Path | None:
        """Labelled points (label, x, y), e.g. accuracy against bytes per frame."""
        plt = _pyplot()
        if plt is None:
            return None
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for label, x, y in points:
            ax.scatter([x], [y], s=25)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if logx:
            ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        return self._save(fig, stem)

    def _save(self, fig, stem: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.plot_path(stem)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.plots.append(path.name)
        return path


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (plots skipped, said once) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: skipping plots (pip install matplotlib)")
        return None
    return plt


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# -- in-process profiles (tools/bench/camera.py, tools/bench/worker_profile.py) ---------------------
def profile_parser(prog: str, doc: str):
    """The arguments every in-process profile takes: --bundle (default models/cifar10) and --data."""
    import argparse

    from tierlite.tools.stack import reference_bundle

    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    p.add_argument("--bundle", default=reference_bundle(), required=reference_bundle() is None)
    p.add_argument("--data", default=DEFAULT_DATA)
    return p


def profile_frames(args, limit: int) -> np.ndarray:
    """A stratified sample of `limit` decoded frames of --data at the bundle's input size."""
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder

    size = tuple(Bundle.load(args.bundle).input_shape[1:3])
    return load_image_folder(args.data, size, limit=limit, seed=0, progress=False).images
