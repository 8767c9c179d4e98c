#!/usr/bin/env python3
"""Draw the Grafana dashboard's panels from a real Prometheus, without Grafana.

    render-dashboard.py PROMETHEUS_URL START END OUTPUT.png [options]

    render-dashboard.py http://127.0.0.1:9099 1764393600 1764393840 docs/dashboard.png \\
        --job blinger-worker --var queue=dash.blinger.outbound --scrape-interval 1 --rate-interval 15s

PROMETHEUS_URL  base URL of a Prometheus (its /api/v1/query_range is used)
START, END      the time range, unix seconds
OUTPUT.png      the picture to write

Every panel of the dashboard JSON (default: deploy/grafana/blinger-worker-dashboard.json) that has
targets is evaluated with query_range over START..END, each target's `expr` with Grafana's variables
replaced:

    $__rate_interval   --rate-interval, else Grafana's own rule: max(4 x scrape interval, step + scrape interval)
    $__interval        the step (--step, else max(scrape interval, range / 300))
    $__range           END - START (also $__range_s, $__range_ms, $__interval_ms)
    $job               --job (default blinger-worker)
    $instance          --instance (default .*, i.e. "All")
    any other variable of the dashboard's `templating` list: --var NAME=VALUE if given, else its
                       current value (textbox, constant, custom), else its allValue / .* when "All"

Panels are laid out by their gridPos (24-column grid), rows are drawn as section headers,
timeseries panels as lines (stacked when the panel stacks) with a legend table (mean, max, last)
named by `legendFormat`, stat and gauge panels as the big number of the last value (unit,
decimals, thresholds and value mappings of the panel applied). A panel whose queries return no
series says "No data": nothing is ever made up. A query Prometheus refuses is shown on its panel
and makes the exit status 1 (the picture is still written).

Options:
    --dashboard FILE        dashboard JSON
    --job NAME              value of $job (default blinger-worker)
    --instance REGEX        value of $instance (default .*)
    --var NAME=VALUE        value of another template variable (repeatable)
    --step SECONDS          query resolution (default: see $__interval above)
    --scrape-interval SECS  the scrape interval of the job, for $__rate_interval (default 15,
                            Grafana's default for a Prometheus data source)
    --rate-interval DUR     force $__rate_interval, e.g. 15s or 1m
    --width PX              picture width in pixels (default 1800)
    --row-height PX         height of one grid unit (default 36)
    --note TEXT             an extra footer line (e.g. what load produced the data)
    --utc / --local         time axis in UTC (default) or the local time zone

Needs matplotlib (e.g. `pip install matplotlib`); the HTTP calls use the standard library.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here: draw straight to the file
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator  # noqa: E402

# Titles and queries are full of "$": plain text, never mathtext.
matplotlib.rcParams["text.parse_math"] = False

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = ROOT / "deploy" / "grafana" / "blinger-worker-dashboard.json"
FOOTER = (
    "Rendered by scripts/render-dashboard.py from the dashboard's own queries against Prometheus "
    "scraping a real blinger-worker + sandbox run; not a Grafana screenshot"
)

# Grafana's dark theme and its classic palette, so the picture reads like the real thing.
BG = "#111217"
PANEL_BG = "#181b1f"
PANEL_BORDER = "#2a2d33"
TEXT = "#ccccdc"
TEXT_DIM = "#8e8e9e"
GRID = "#2c3036"
PALETTE = [
    "#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0",
    "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477",
]
NAMED_COLORS = {
    "green": "#73BF69", "dark-green": "#37872D", "red": "#F2495C", "dark-red": "#C4162A",
    "orange": "#FF9830", "dark-orange": "#FA6400", "yellow": "#FADE2A", "dark-yellow": "#E0B400",
    "blue": "#5794F2", "dark-blue": "#1F60C4", "purple": "#B877D9", "dark-purple": "#8F3BB8",
    "text": TEXT, "transparent": PANEL_BG,
}


# ---------------------------------------------------------------------------------------------
# Variables and queries


def promql_duration(seconds: float) -> str:
    """A PromQL duration literal: whole seconds where possible, else milliseconds."""
    ms = int(round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def parse_duration(text: str) -> float:
    """'15s', '1m', '1m30s', '500ms' or plain seconds -> seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: want NAME=VALUE")
    return name, value


def template_values(dashboard: dict, args: argparse.Namespace) -> dict[str, str]:
    """Values of the dashboard's template variables, as they would be with "All" selected."""
    given = dict(args.var)
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var.get("name")
        if not name or var.get("type") == "datasource":
            continue  # a data source variable only picks the Prometheus: there is one here
        current = var.get("current") or {}
        value = current.get("value")
        if isinstance(value, list):
            if "$__all" in value or not value:
                value = var.get("allValue") or ".*"
            elif len(value) == 1:
                value = value[0]
            else:  # Grafana formats several selected values as a regex alternation
                value = "(" + "|".join(re.escape(v) for v in value) + ")"
        elif value == "$__all":
            value = var.get("allValue") or ".*"
        if value in (None, "") and var.get("type") in ("textbox", "constant", "custom"):
            value = var.get("query", "")
        if value in (None, ""):
            value = var.get("allValue") or ".*"
        values[name] = str(value)
    values["job"] = args.job
    values["instance"] = args.instance
    values.update(given)
    return values


VAR_RE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> tuple[str, list[str]]:
    """Replaces $var, ${var}, ${var:fmt} and [[var]]; returns the names it could not resolve."""
    unknown: list[str] = []

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        unknown.append(name)
        return m.group(0)

    return VAR_RE.sub(repl, expr), unknown


class Prometheus:
    def __init__(self, base: str, timeout: float = 30.0):
        self.base = base.rstrip("/")
        self.timeout = timeout

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = urllib.parse.urlencode(
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": promql_duration(step)}
        )
        url = f"{self.base}/api/v1/query_range?{params}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                answer = json.load(resp)
        except urllib.error.HTTPError as e:
            # Prometheus explains a refused query in the JSON body of its 4xx answer.
            try:
                answer = json.load(e)
            except Exception:  # noqa: BLE001 - any unreadable body: report the HTTP error
                raise RuntimeError(f"HTTP {e.code} from {self.base}") from e
        if answer.get("status") != "success":
            raise RuntimeError(f"{answer.get('errorType', 'error')}: {answer.get('error', answer)}")
        if answer["data"]["resultType"] != "matrix":
            raise RuntimeError(f"unexpected result type {answer['data']['resultType']}")
        return answer["data"]["result"]


def legend_name(fmt: str | None, labels: dict, expr: str) -> str:
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    if not shown:
        return expr  # Grafana names a label-less series by its query
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items()))
    return f"{labels.get('__name__', '')}{{{inner}}}"


# ---------------------------------------------------------------------------------------------
# Units


def auto_decimals(v: float) -> int:
    a = abs(v)
    if a == 0 or a >= 100:
        return 0
    if a >= 10:
        return 1
    if a >= 1:
        return 2
    return 3


def fmt_number(v: float, decimals: int | None) -> str:
    if decimals is None:
        text = f"{v:.{auto_decimals(v)}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return f"{v:.{decimals}f}"


def fmt_unit(v: float, unit: str | None, decimals: int | None = None) -> str:
    """Grafana-like value formatting for the units this dashboard uses."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    unit = unit or "short"
    if unit == "percentunit":
        return fmt_number(v * 100, decimals) + "%"
    if unit == "percent":
        return fmt_number(v, decimals) + "%"
    if unit in ("reqps", "rps", "ops", "wps"):
        suffix = {"reqps": " req/s", "rps": " rd/s", "ops": " ops/s", "wps": " wr/s"}[unit]
        return fmt_si(v, decimals) + suffix
    if unit == "s":
        a = abs(v)
        if a == 0:
            return "0 s"
        if a < 1e-3:
            return fmt_number(v * 1e6, decimals) + " µs"
        if a < 1:
            return fmt_number(v * 1e3, decimals) + " ms"
        if a < 60:
            return fmt_number(v, decimals) + " s"
        if a < 3600:
            return fmt_number(v / 60, decimals) + " min"
        return fmt_number(v / 3600, decimals) + " hour"
    if unit == "ms":
        return fmt_unit(v / 1000, "s", decimals)
    if unit == "bytes":
        a, i = abs(v), 0
        names = ["B", "KiB", "MiB", "GiB", "TiB"]
        while a >= 1024 and i < len(names) - 1:
            a /= 1024
            v /= 1024
            i += 1
        return fmt_number(v, decimals) + " " + names[i]
    return fmt_si(v, decimals)


def fmt_si(v: float, decimals: int | None) -> str:
    a = abs(v)
    for div, suffix in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if a >= div:
            return fmt_number(v / div, decimals) + suffix
    return fmt_number(v, decimals)


def color_of(name: str | None) -> str:
    if not name:
        return NAMED_COLORS["green"]
    if name.startswith("#"):
        return name
    m = re.fullmatch(r"rgba?\((\d+),\s*(\d+),\s*(\d+)(?:,\s*[\d.]+)?\)", name)
    if m:
        return "#%02x%02x%02x" % tuple(int(x) for x in m.groups())
    return NAMED_COLORS.get(name, NAMED_COLORS.get(name.replace("semi-dark-", "").replace("light-", ""), TEXT))


def threshold_color(value: float, thresholds: dict | None) -> str:
    steps = (thresholds or {}).get("steps") or [{"color": "green", "value": None}]
    color = steps[0].get("color")
    for step in steps:
        limit = step.get("value")
        if limit is None or value >= limit:
            color = step.get("color")
    return color_of(color)


def apply_mappings(value: float, mappings: list[dict]) -> tuple[str | None, str | None]:
    """Value mappings of type "value" (the only kind this dashboard uses) and "range"."""
    for m in mappings or []:
        opts = m.get("options", {})
        if m.get("type") == "value":
            for key, result in opts.items():
                try:
                    if float(key) == value:
                        return result.get("text"), result.get("color")
                except ValueError:
                    continue
        elif m.get("type") == "range":
            lo, hi = opts.get("from"), opts.get("to")
            if (lo is None or value >= lo) and (hi is None or value <= hi):
                r = opts.get("result", {})
                return r.get("text"), r.get("color")
    return None, None


# ---------------------------------------------------------------------------------------------
# Drawing


class Canvas:
    """Pixel geometry: Grafana's 24-column grid mapped onto the figure."""

    def __init__(self, width: int, row_height: int, grid_rows: int, footer_lines: int = 1, dpi: int = 100):
        self.W = width
        self.pad = 12
        self.header = 58
        self.footer = 34 + 14 * footer_lines
        self.rh = row_height
        self.cw = (width - 2 * self.pad) / 24
        self.H = self.header + grid_rows * row_height + self.footer
        self.dpi = dpi
        self.fig = plt.figure(figsize=(width / dpi, self.H / dpi), dpi=dpi, facecolor=BG)

    def rect(self, gp: dict, gap: float = 8) -> tuple[float, float, float, float]:
        """A gridPos -> (left, top, width, height) in pixels from the top-left corner."""
        x = self.pad + gp.get("x", 0) * self.cw + gap / 2
        y = self.header + gp.get("y", 0) * self.rh + gap / 2
        return x, y, gp.get("w", 12) * self.cw - gap, gp.get("h", 8) * self.rh - gap

    def axes(self, left: float, top: float, width: float, height: float, **kw):
        """Axes at a pixel box (matplotlib counts from the bottom, in figure fractions)."""
        return self.fig.add_axes(
            [left / self.W, 1 - (top + height) / self.H, width / self.W, height / self.H], **kw
        )

    def text(self, x: float, y: float, s: str, **kw):
        return self.fig.text(x / self.W, 1 - y / self.H, s, **kw)


def panel_box(cv: Canvas, box, title: str, face: str = PANEL_BG):
    left, top, width, height = box
    ax = cv.axes(left, top, width, height)
    ax.set_axis_off()
    ax.add_patch(
        FancyBboxPatch((0.002, 0.002), 0.996, 0.996, boxstyle="round,pad=0,rounding_size=0.006",
                       transform=ax.transAxes, facecolor=face, edgecolor=PANEL_BORDER, linewidth=0.8)
    )
    cv.text(left + 9, top + 15, title, color=TEXT if face == PANEL_BG else "white", fontsize=10,
            fontweight="bold", va="center", ha="left")
    return ax


def no_data(cv: Canvas, box, message: str = "No data", color: str = TEXT_DIM, size: float = 13):
    left, top, width, height = box
    cv.text(left + width / 2, top + height / 2 + 8, message, color=color, fontsize=size,
            ha="center", va="center", wrap=True)


def time_ticks(start: float, end: float, width_px: float) -> tuple[list[float], str]:
    """Tick positions at round times, about one per 110 px."""
    want = max(2, int(width_px / 110))
    span = end - start
    for step in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400):
        if span / step <= want:
            break
    first = math.ceil(start / step) * step
    # A label centred on either edge would run under the y axis labels or out of the panel.
    margin = span * 0.035
    ticks = [t for t in range(int(first), int(end) + 1, step) if start + margin <= t <= end - margin]
    return ticks, ("%H:%M:%S" if step < 60 else "%H:%M")


def duration_ticks(lo: float, hi: float) -> list[float]:
    for step in (15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400):
        if (hi - lo) / step <= 5:
            break
    return [t for t in range(int(math.ceil(lo / step) * step), int(hi) + 1, step)]


def series_grid(values: list, start: float, end: float, step: float) -> tuple[list[float], list[float]]:
    """Puts a series onto the full step grid, missing points as NaN (drawn as gaps, like Grafana)."""
    n = int(round((end - start) / step)) + 1
    xs = [start + i * step for i in range(n)]
    ys = [math.nan] * n
    for t, v in values:
        i = int(round((float(t) - start) / step))
        if 0 <= i < n:
            ys[i] = float(v)
    return xs, ys


def finite(ys: list[float]) -> list[float]:
    return [y for y in ys if not (math.isnan(y) or math.isinf(y))]


def draw_stat(cv: Canvas, panel: dict, box, series: list[dict], error: str | None):
    fc = panel.get("fieldConfig", {}).get("defaults", {})
    opts = panel.get("options", {})
    last = None
    spark = None
    for s in series:
        vals = finite(s["ys"])
        if vals:
            # lastNotNull, the panel's reducer
            last = next(y for y in reversed(s["ys"]) if not math.isnan(y))
            spark = s
            break
    if error or last is None:
        panel_box(cv, box, panel.get("title", ""))
        if error:
            no_data(cv, box, "Query error:\n" + error[:160], color=NAMED_COLORS["red"], size=8)
        else:
            no_data(cv, box)
        return
    text, mapped_color = apply_mappings(last, fc.get("mappings", []))
    color = color_of(mapped_color) if mapped_color else threshold_color(last, fc.get("thresholds"))
    background = opts.get("colorMode", "value") == "background"
    face = color if background else PANEL_BG
    ax = panel_box(cv, box, panel.get("title", ""), face=face)
    left, top, width, height = box
    if spark and opts.get("graphMode", "area") == "area" and len(finite(spark["ys"])) > 1:
        # Grafana's stat sparkline: the series, faint, along the bottom of the panel.
        sp = cv.axes(left + 1, top + height * 0.55, width - 2, height * 0.45 - 1)
        sp.set_axis_off()
        sp.set_facecolor("none")
        ys = spark["ys"]
        vals = finite(ys)
        lo, hi = min(vals), max(vals)
        sp.set_xlim(spark["xs"][0], spark["xs"][-1])
        sp.set_ylim(lo - (hi - lo) * 0.05 - 1e-9, hi + (hi - lo) * 0.6 + 1e-9)
        line = "white" if background else color
        sp.fill_between(spark["xs"], [y if not math.isnan(y) else lo for y in ys], lo - 1,
                        color=line, alpha=0.18, linewidth=0)
        sp.plot(spark["xs"], ys, color=line, alpha=0.55, linewidth=1)
    label = text if text is not None else fmt_unit(last, fc.get("unit"), fc.get("decimals"))
    size = min(34, max(12, 0.8 * width / (max(4, len(label)) * 0.62) * 72 / cv.dpi))
    cv.text(left + width / 2, top + height * 0.56, label, color="white" if background else color,
            fontsize=size, fontweight="bold", ha="center", va="center")
    del ax


def draw_timeseries(cv: Canvas, panel: dict, box, series: list[dict], errors: list[str],
                    start: float, end: float, tz_utc: bool):
    fc = panel.get("fieldConfig", {}).get("defaults", {})
    custom = fc.get("custom", {})
    unit = fc.get("unit")
    left, top, width, height = box
    panel_box(cv, box, panel.get("title", ""))
    if errors:
        no_data(cv, box, "Query error:\n" + "\n".join(e[:200] for e in errors), color=NAMED_COLORS["red"], size=8)
        return
    if not series:
        no_data(cv, box)
        return

    # Legend table below the plot, as the panels ask (displayMode table, placement bottom, calcs
    # mean/max/last). Several columns of entries when many series would squeeze the plot.
    legend_opts = panel.get("options", {}).get("legend", {})
    show_legend = legend_opts.get("showLegend", True)
    line_h = 12.5
    title_h, xaxis_h, plot_min = 28, 18, 0.38 * height
    legend_rows = 0
    columns = 1
    n = len(series)
    if show_legend:
        max_rows = max(1, int((height - title_h - xaxis_h - plot_min - 6) / line_h) - 1)
        columns = 1 if n <= max_rows else min(3, math.ceil(n / max_rows))
        if width / columns < 230:
            columns = max(1, int(width // 230))
        legend_rows = min(max_rows, math.ceil(n / columns))
    legend_h = (legend_rows + 1) * line_h + 6 if show_legend else 0

    plot_left, plot_right = 62, 12
    ax = cv.axes(left + plot_left, top + title_h, width - plot_left - plot_right,
                 height - title_h - xaxis_h - legend_h)
    ax.set_facecolor(PANEL_BG)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color=GRID, linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(colors=TEXT_DIM, labelsize=7.5, length=0, pad=3)

    stacked = custom.get("stacking", {}).get("mode", "none") == "normal"
    steps = custom.get("lineInterpolation") == "stepAfter"
    fill = custom.get("fillOpacity", 0) / 100.0
    lw = custom.get("lineWidth", 1)
    base = [0.0] * len(series[0]["xs"])
    top_values: list[float] = []
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        s["color"] = color
        xs, ys = s["xs"], s["ys"]
        if stacked:
            # Stacks add up where a point exists; a gap in one series stays a gap in its band.
            upper = [b + y if not math.isnan(y) else math.nan for b, y in zip(base, ys)]
            lower = [b if not math.isnan(y) else math.nan for b, y in zip(base, ys)]
            ax.fill_between(xs, lower, upper, color=color, alpha=max(fill, 0.08), linewidth=0,
                            step="post" if steps else None)
            ax.plot(xs, upper, color=color, linewidth=lw, drawstyle="steps-post" if steps else "default")
            base = [u if not math.isnan(u) else b for u, b in zip(upper, base)]
            top_values += finite(upper)
        else:
            if fill > 0:
                ax.fill_between(xs, [0 if not math.isnan(y) else math.nan for y in ys], ys, color=color,
                                alpha=fill, linewidth=0, step="post" if steps else None)
            ax.plot(xs, ys, color=color, linewidth=lw, drawstyle="steps-post" if steps else "default")
            top_values += finite(ys)

    ax.set_xlim(start, end)
    lo = fc.get("min")
    hi = fc.get("max")
    data_hi = max(top_values) if top_values else 1.0
    data_lo = min(top_values) if top_values else 0.0
    if hi is None:
        hi = data_hi * 1.08 if data_hi > 0 else 1.0
    if lo is None:
        lo = min(0.0, data_lo)
    if hi <= lo:
        hi = lo + 1
    # A little room at both ends, so a line lying on a fixed min or max (a 0/1 gauge) stays visible.
    pad = (hi - lo) * 0.02
    ax.set_ylim(lo - pad, hi + pad)
    if fc.get("decimals") == 0 and hi - lo <= 4:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    elif unit == "bytes" and hi > 1024:
        # Round binary sizes (16 MiB, 32 MiB), not round decimal ones (14.3 MiB).
        scale = 1024 ** int(math.log(hi, 1024))
        ticks = MaxNLocator(nbins=5).tick_values(lo / scale, hi / scale) * scale
        ax.yaxis.set_major_locator(FixedLocator([t for t in ticks if lo <= t <= hi]))
    elif unit == "s" and hi - lo >= 60:
        # Durations of minutes: ticks at round minutes, not at 80 s ("1.33 min").
        ax.yaxis.set_major_locator(FixedLocator(duration_ticks(lo, hi)))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_unit(v, unit, fc.get("decimals"))))
    ticks, tfmt = time_ticks(start, end, width - plot_left - plot_right)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    conv = time.gmtime if tz_utc else time.localtime
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: time.strftime(tfmt, conv(v))))

    if not show_legend:
        return
    # The legend table: swatch, name, mean, max, last (lastNotNull).
    ly = top + height - legend_h + 2
    col_w = (width - 16) / columns
    gutter = 18 if columns > 1 else 0  # between legend columns, so a value never touches a swatch
    val_w = 60
    name_w = col_w - gutter - 3 * val_w - 17

    def value_x(x0: float, j: int) -> float:  # right edge of the j-th value column
        return x0 + col_w - gutter - (2 - j) * val_w

    fs = 7.3
    for c in range(columns):
        x0 = left + 8 + c * col_w
        for j, head in enumerate(("Mean", "Max", "Last *")):
            cv.text(value_x(x0, j), ly + line_h / 2, head, color=TEXT_DIM, fontsize=fs,
                    ha="right", va="center", fontweight="bold")
    shown = legend_rows * columns
    entries = series if n <= shown else series[: shown - 1]
    for k, s in enumerate(entries):
        c, r = divmod(k, legend_rows) if legend_rows else (0, 0)
        x0 = left + 8 + c * col_w
        y = ly + (r + 1.5) * line_h
        cv.fig.add_artist(Rectangle(((x0) / cv.W, 1 - (y + 1.5) / cv.H), 12 / cv.W, 3 / cv.H,
                                    color=s["color"], transform=cv.fig.transFigure))
        name = s["name"]
        max_chars = max(6, int(name_w / 5.4))
        if len(name) > max_chars:
            name = name[: max_chars - 1] + "…"
        cv.text(x0 + 17, y, name, color=TEXT, fontsize=fs, ha="left", va="center")
        vals = finite(s["ys"])
        lastv = next((y_ for y_ in reversed(s["ys"]) if not math.isnan(y_)), math.nan)
        stats = (sum(vals) / len(vals) if vals else math.nan, max(vals) if vals else math.nan, lastv)
        for j, v in enumerate(stats):
            cv.text(value_x(x0, j), y, fmt_unit(v, unit, fc.get("decimals")), color=TEXT,
                    fontsize=fs, ha="right", va="center")
    if n > shown:
        c, r = divmod(shown - 1, legend_rows)
        cv.text(left + 8 + c * col_w + 17, ly + (r + 1.5) * line_h, f"+ {n - shown + 1} more series",
                color=TEXT_DIM, fontsize=fs, ha="left", va="center", style="italic")


def draw_row(cv: Canvas, panel: dict):
    left, top, width, height = cv.rect(panel["gridPos"], gap=0)
    collapsed = panel.get("collapsed")
    title = ("▸ " if collapsed else "▾ ") + panel.get("title", "")
    if collapsed and panel.get("panels"):
        title += f"  ({len(panel['panels'])} panels, collapsed)"
    cv.text(left + 10, top + height / 2 + 3, title, color=TEXT, fontsize=11.5, fontweight="bold",
            ha="left", va="center")


def save_png(fig, path: Path, dpi: int):
    """A palette PNG: a flat dark UI needs no more than 256 colours, and it is a third of the size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=BG)
    buf.seek(0)
    try:
        from PIL import Image  # comes with matplotlib
    except ImportError:
        path.write_bytes(buf.getvalue())
        return
    image = Image.open(buf).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s PROMETHEUS_URL START END OUTPUT.png [options]",
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("prometheus")
    ap.add_argument("start", type=float)
    ap.add_argument("end", type=float)
    ap.add_argument("output", type=Path)
    ap.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD)
    ap.add_argument("--job", default="blinger-worker")
    ap.add_argument("--instance", default=".*")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", type=name_value)
    ap.add_argument("--step", type=float)
    ap.add_argument("--scrape-interval", type=parse_duration, default=15.0)
    ap.add_argument("--rate-interval", type=parse_duration)
    ap.add_argument("--width", type=int, default=1800)
    ap.add_argument("--row-height", type=int, default=36)
    ap.add_argument("--note", default="")
    tz = ap.add_mutually_exclusive_group()
    tz.add_argument("--utc", dest="utc", action="store_true", default=True)
    tz.add_argument("--local", dest="utc", action="store_false")
    args = ap.parse_args()
    if args.end <= args.start:
        ap.error("END must be after START")

    dashboard = json.loads(args.dashboard.read_text())
    span = args.end - args.start
    # Grafana: $__interval = range / max data points, never below the scrape interval.
    step = args.step or max(args.scrape_interval, math.ceil(span / 300))
    rate_interval = args.rate_interval or max(4 * args.scrape_interval, step + args.scrape_interval)
    values = template_values(dashboard, args)
    values.update({
        "__rate_interval": promql_duration(rate_interval),
        "__rate_interval_ms": str(int(rate_interval * 1000)),
        "__interval": promql_duration(step),
        "__interval_ms": str(int(step * 1000)),
        "__range": promql_duration(round(span)),
        "__range_s": str(int(round(span))),
        "__range_ms": str(int(round(span * 1000))),
    })
    prom = Prometheus(args.prometheus)

    # Panels of collapsed rows are hidden in Grafana until expanded: so here too (the row says so).
    panels = dashboard.get("panels", [])
    grid_rows = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels if "gridPos" in p), default=8)
    # The footer's second part (time range and --note) wraps at about 6.3 px a character.
    footer_chars = len(args.note) + 60
    cv = Canvas(args.width, args.row_height, grid_rows,
                footer_lines=math.ceil(footer_chars / int((args.width - 24) / 6.3)) + 1)

    failed = False
    report = []
    for panel in panels:
        ptype = panel.get("type")
        if ptype == "row":
            draw_row(cv, panel)
            continue
        box = cv.rect(panel.get("gridPos", {}))
        series: list[dict] = []
        errors: list[str] = []
        for target in panel.get("targets", []):
            if target.get("hide") or not target.get("expr"):
                continue
            expr, unknown = substitute(target["expr"], values)
            if unknown:
                errors.append(f"unknown variable(s) {', '.join('$' + u for u in unknown)}")
                continue
            try:
                result = prom.query_range(expr, args.start, args.end, step)
            except Exception as e:  # noqa: BLE001 - shown on the panel and in the exit status
                errors.append(str(e))
                print(f"panel {panel.get('title')!r}: query failed: {e}\n    {expr}", file=sys.stderr)
                continue
            named = []
            for r in result:
                xs, ys = series_grid(r["values"], args.start, args.end, step)
                named.append({"name": legend_name(target.get("legendFormat"), r["metric"], expr),
                              "xs": xs, "ys": ys})
            series += sorted(named, key=lambda s: s["name"])
        failed |= bool(errors)
        has_points = any(finite(s["ys"]) for s in series)
        report.append((panel.get("title"), len(series), has_points, bool(errors)))
        if not panel.get("targets"):
            panel_box(cv, box, panel.get("title", ""))
            no_data(cv, box, f"({ptype} panel: no query)")
        elif ptype in ("stat", "gauge", "bargauge", "singlestat"):
            draw_stat(cv, panel, box, series, "; ".join(errors) or None)
        elif ptype in ("timeseries", "graph"):
            draw_timeseries(cv, panel, box, series, errors, args.start, args.end, args.utc)
        else:
            panel_box(cv, box, panel.get("title", ""))
            no_data(cv, box, f"({ptype} panel not drawn by this script)")

    conv = time.gmtime if args.utc else time.localtime
    zone = "UTC" if args.utc else time.strftime("%Z")
    t0 = time.strftime("%Y-%m-%d %H:%M:%S", conv(args.start))
    t1 = time.strftime("%H:%M:%S", conv(args.end))
    dur = f"{int(span // 60)}m{int(span % 60):02d}s"
    shown_vars = ", ".join(
        f"{k}={'All' if v == '.*' else v}" for k, v in values.items() if not k.startswith("__")
    )
    cv.text(cv.pad + 6, 22, dashboard.get("title", "dashboard"), color=TEXT, fontsize=15, fontweight="bold",
            ha="left", va="center")
    cv.text(cv.pad + 6, 44, shown_vars, color=TEXT_DIM, fontsize=9, ha="left", va="center")
    cv.text(cv.W - cv.pad - 6, 22, f"{t0} → {t1} {zone}  ({dur})", color=TEXT, fontsize=10.5, ha="right",
            va="center")
    cv.text(cv.W - cv.pad - 6, 44,
            f"step {promql_duration(step)}, $__rate_interval = {promql_duration(rate_interval)}, "
            f"$__range = {promql_duration(round(span))}", color=TEXT_DIM, fontsize=9, ha="right", va="center")
    fy = cv.H - cv.footer
    cv.text(cv.pad + 6, fy + 16, FOOTER, color=TEXT, fontsize=9, ha="left", va="center", style="italic")
    lines = textwrap.wrap(f"Time range {t0} → {t1} {zone} ({dur}).  {args.note}".rstrip(),
                          width=int((cv.W - 2 * cv.pad) / 6.3))
    for k, line in enumerate(lines):
        cv.text(cv.pad + 6, fy + 34 + k * 14, line, color=TEXT_DIM, fontsize=8.5, ha="left", va="center")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_png(cv.fig, args.output, cv.dpi)
    for title, n, has_points, err in report:
        state = "query error" if err else ("data" if has_points else ("series, no points" if n else "No data"))
        print(f"  {title:<45} {n:>3} series  {state}")
    print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
