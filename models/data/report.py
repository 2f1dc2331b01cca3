"""One self-contained HTML page a person reads: `eval.json` (+ training history) → inline SVG charts.

No plotting library and nothing fetched: every chart is SVG written here, so the page opens
offline and can be attached to a ticket. Sizes adapt to the number of classes (a 50-class
confusion matrix gets 11-pixel cells and small labels; hovering a cell shows its count).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

PLOT_W, PLOT_H = 420, 260
MARGIN = 48
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _svg(width: float, height: float, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">{"".join(body)}</svg>')


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _blue(share: float) -> str:
    """White (0) → dark blue (1)."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (int(255 - share * (255 - c)) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def confusion_svg(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Heatmap, rows = true label, columns = predicted; colour = share of the row."""
    n = len(labels)
    cell = max(8, min(28, 560 // max(n, 1)))
    font = max(7, min(11, cell - 2))
    pad = 8 + font * 0.6 * max((len(str(label)) for label in labels), default=1)
    body = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = pad + i * cell
        body.append(f'<text x="{pad - 4:.0f}" y="{y + cell * 0.7:.0f}" text-anchor="end" font-size="{font}">{_e(labels[i])}</text>')
        for j, count in enumerate(row):
            x = pad + j * cell
            body.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{cell}" height="{cell}" fill="{_blue(count / total)}" '
                        f'stroke="#eee"><title>true {_e(labels[i])} → predicted {_e(labels[j])}: {count}</title></rect>')
            if count and cell >= 20:
                colour = "white" if count / total > 0.5 else "black"
                body.append(f'<text x="{x + cell / 2:.0f}" y="{y + cell * 0.68:.0f}" text-anchor="middle" '
                            f'font-size="{font - 1}" fill="{colour}">{count}</text>')
    for j, label in enumerate(labels):
        x = pad + j * cell + cell * 0.7
        body.append(f'<text transform="translate({x:.0f},{pad - 4:.0f}) rotate(-60)" font-size="{font}">{_e(label)}</text>')
    side = pad + n * cell + 4
    return _svg(side, side, body)


def per_class_svg(per_class: dict[str, dict[str, float]]) -> str:
    """Precision, recall and F1 per class as grouped horizontal bars (one row per class)."""
    labels = list(per_class)
    bar = max(3, min(8, 480 // max(len(labels), 1)))
    row = 3 * bar + 4
    pad = 8 + 6.5 * max((len(label) for label in labels), default=1)
    width = 360
    body = [f'<text x="{pad + i * 90:.0f}" y="12" fill="{COLOURS[i]}">■ {name}</text>'
            for i, name in enumerate(("precision", "recall", "f1"))]
    for r, label in enumerate(labels):
        y = 20 + r * row
        body.append(f'<text x="{pad - 4:.0f}" y="{y + row * 0.6:.0f}" text-anchor="end" font-size="{min(11, row)}">{_e(label)}</text>')
        for k, metric in enumerate(("precision", "recall", "f1")):
            value = per_class[label].get(metric, 0.0)
            body.append(f'<rect x="{pad:.0f}" y="{y + k * bar}" width="{value * width:.1f}" height="{bar - 0.5}" '
                        f'fill="{COLOURS[k]}"><title>{_e(label)} {metric}: {value:.3f}</title></rect>')
    body.append(f'<line x1="{pad + width:.0f}" x2="{pad + width:.0f}" y1="16" y2="{20 + len(labels) * row}" stroke="#999" stroke-dasharray="3"/>')
    return _svg(pad + width + 30, 24 + len(labels) * row, body)


class _Axes:
    """A unit-less plot box: data (x, y) in the given ranges → pixel positions."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range

    def px(self, x: float) -> float:
        return MARGIN + (x - self.x0) / ((self.x1 - self.x0) or 1) * PLOT_W

    def py(self, y: float) -> float:
        return 10 + PLOT_H - (y - self.y0) / ((self.y1 - self.y0) or 1) * PLOT_H

    def frame(self, x_label: str, y_label: str) -> list[str]:
        body = [f'<rect x="{MARGIN}" y="10" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#444"/>']
        for k in range(5):
            xv = self.x0 + k * (self.x1 - self.x0) / 4
            yv = self.y0 + k * (self.y1 - self.y0) / 4
            body.append(f'<text x="{self.px(xv):.0f}" y="{PLOT_H + 24}" text-anchor="middle">{xv:.3g}</text>')
            body.append(f'<text x="{MARGIN - 4}" y="{self.py(yv) + 4:.0f}" text-anchor="end">{yv:.3g}</text>')
        body.append(f'<text x="{MARGIN + PLOT_W / 2}" y="{PLOT_H + 40}" text-anchor="middle">{_e(x_label)}</text>')
        body.append(f'<text transform="translate(12,{10 + PLOT_H / 2}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
        return body


def line_chart_svg(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
                   y_range: tuple[float, float] | None = None, x_range: tuple[float, float] | None = None,
                   diagonal: bool = False) -> str:
    """Lines with point markers, one colour per series, and a legend."""
    points = [p for values in series.values() for p in values if p[1] is not None]
    if not points:
        return "<p>(no data)</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    axes = _Axes(x_range or (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1),
                 y_range or (min(0.0, min(ys)), max(ys) * 1.05 or 1.0))
    body = axes.frame(x_label, y_label)
    if diagonal:
        body.append(f'<line x1="{axes.px(axes.x0):.0f}" y1="{axes.py(axes.y0):.0f}" x2="{axes.px(axes.x1):.0f}" '
                    f'y2="{axes.py(axes.y1):.0f}" stroke="#aaa" stroke-dasharray="4"/>')
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        kept = [(x, y) for x, y in values if y is not None]
        path = " ".join(f"{axes.px(x):.1f},{axes.py(y):.1f}" for x, y in kept)
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        body.extend(f'<circle cx="{axes.px(x):.1f}" cy="{axes.py(y):.1f}" r="2.5" fill="{colour}"><title>{_e(name)}: '
                    f'{x:.3g}, {y:.3g}</title></circle>' for x, y in kept)
        body.append(f'<text x="{MARGIN + PLOT_W + 8}" y="{24 + 16 * k}" fill="{colour}">■ {_e(name)}</text>')
    return _svg(MARGIN + PLOT_W + 130, PLOT_H + 50, body)


def reliability_svg(bins: list[dict[str, Any]], title: str) -> str:
    """Accuracy per confidence bin (bars) against the diagonal; the gap shaded red."""
    axes = _Axes((0.0, 1.0), (0.0, 1.0))
    body = axes.frame("confidence", "accuracy")
    body.append(f'<line x1="{axes.px(0)}" y1="{axes.py(0)}" x2="{axes.px(1)}" y2="{axes.py(1)}" stroke="#aaa" stroke-dasharray="4"/>')
    for b in bins:
        if not b["count"]:
            continue
        x, w = axes.px(b["lower"]), axes.px(b["upper"]) - axes.px(b["lower"])
        acc, conf = b["accuracy"], b["confidence"]
        body.append(f'<rect x="{x:.1f}" y="{axes.py(acc):.1f}" width="{w - 1:.1f}" height="{axes.py(0) - axes.py(acc):.1f}" '
                    f'fill="{COLOURS[0]}"><title>{b["count"]} images, confidence {conf:.3f}, accuracy {acc:.3f}</title></rect>')
        top, bottom = max(acc, conf), min(acc, conf)
        body.append(f'<rect x="{x:.1f}" y="{axes.py(top):.1f}" width="{w - 1:.1f}" height="{axes.py(bottom) - axes.py(top):.1f}" '
                    'fill="#d62728" fill-opacity="0.35"/>')
    return f'<figure><figcaption>{_e(title)}</figcaption>{_svg(MARGIN + PLOT_W + 20, PLOT_H + 50, body)}</figure>'


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("model", report.get("model", "")), ("images", report.get("samples")),
            ("accuracy", _fmt(report.get("accuracy"))),
            (f"top-{report.get('top_k', '')} accuracy", _fmt(report.get("top_k_accuracy"))),
            ("macro F1", _fmt(report.get("macro_avg", {}).get("f1")))]
    calibration = report.get("calibration")
    if calibration:
        before, after = calibration["before"], calibration["after"]
        rows.append(("temperature", _fmt(calibration.get("temperature"))))
        for key, name in (("ece", "ECE (15 bins)"), ("nll", "NLL"), ("brier", "Brier")):
            rows.append((f"{name} before → after", f"{_fmt(before[key], 4)} → {_fmt(after[key], 4)}"))
    if report.get("auto"):
        auto = report["auto"]
        rows.append(("min_confidence=auto", f"coverage {_fmt(auto['coverage'])}, accuracy of answered {_fmt(auto['accuracy'])}"))
    if report.get("in_domain"):
        rows.append(("in domain (test images)", _fmt(report["in_domain"]["share_in_domain"])))
    return rows


def render_report(report: dict[str, Any], history: list[dict[str, Any]] | None = None, title: str | None = None) -> str:
    """The HTML page for an eval.json report and (optionally) the training history."""
    title = title or f"tuneserve report: {report.get('model', '')}"
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _summary_rows(report))
    sections = [f"<h1>{_e(title)}</h1><table>{table}</table>"]
    matrix = report.get("confusion_matrix")
    if matrix:
        sections.append(f"<h2>Confusion matrix</h2><p>rows: true label; columns: predicted; colour: share of the row.</p>"
                        f"{confusion_svg(matrix['labels'], matrix['matrix'])}")
    if report.get("per_class"):
        sections.append(f"<h2>Per-class precision, recall, F1</h2>{per_class_svg(report['per_class'])}")
    calibration = report.get("calibration")
    if calibration:
        sections.append("<h2>Reliability diagram</h2><p>blue bars: accuracy per confidence bin; shaded red: the "
                        "gap to the bin's mean confidence (perfect calibration is the diagonal; hover a bar for "
                        "its count).</p>"
                        + reliability_svg(calibration["before"]["reliability"], "before (T = 1)")
                        + reliability_svg(calibration["after"]["reliability"], f"after (T = {calibration['temperature']:.3f})"))
    if report.get("risk_coverage"):
        curve = [(row["coverage"], row["accuracy"]) for row in report["risk_coverage"]]
        series = {"global min_confidence": sorted(curve)}
        if report.get("auto"):
            series["auto"] = [(report["auto"]["coverage"], report["auto"]["accuracy"])]
        sections.append("<h2>Risk–coverage</h2><p>accuracy of the answered images against the share answered, "
                        "as min_confidence rises.</p>"
                        + line_chart_svg(series, "coverage", "selective accuracy", x_range=(0.0, 1.0),
                                         y_range=(min(0.9, min(y for _, y in curve if y is not None) - 0.05), 1.0)))
    if history:
        epochs = [h["epoch"] for h in history]
        losses = {name: list(zip(epochs, [h.get(name) for h in history])) for name in ("train_loss", "val_loss")}
        accuracy = {"val_accuracy": list(zip(epochs, [h.get("val_accuracy") for h in history]))}
        sections.append("<h2>Training curves</h2>" + line_chart_svg(losses, "epoch", "loss")
                        + line_chart_svg(accuracy, "epoch", "accuracy", y_range=(0.0, 1.0)))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}th,td{text-align:left;padding:3px 12px;border-bottom:1px solid #ddd}"
             "svg{margin:6px 12px 6px 0;vertical-align:top}"
             "figure{display:inline-block;margin:0}figcaption{font-weight:bold;margin-left:48px}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")


def write_report(path: str | Path, report: dict[str, Any], history: list[dict[str, Any]] | None = None,
                 title: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(report, history, title), encoding="utf-8")
    return path
