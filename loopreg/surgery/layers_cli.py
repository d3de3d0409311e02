"""``loopreg layers``: per-layer angular distance and block influence of a checkpoint over calibration
text, the encoder / thinking / decoder split, and the keep-all loop spec it proposes.

    loopreg layers SRC --text FILE [--tokens N] [--loops L] [--json OUT] [--png OUT]

SRC is anything ``loopreg surgery`` accepts (Hugging Face folder, ``.gguf`` file, loopreg model folder, hub
id); ``loopreg surgery SRC --spec auto --loops L --text FILE`` applies the proposal. A user error raises a
one-line :class:`~loopreg.errors.UserError` (``loopreg`` prints it and exits 2) before any output file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from loopreg.errors import UserError, writing
from loopreg.surgery.analysis import (DEFAULT_TOKENS, LayerAnalysis, Split, calibration_tokens, layer_analysis,
                                      token_windows)
from loopreg.tables import print_table

__all__ = ["cli_main", "print_analysis", "write_json", "write_png"]


def cli_main(argv: list[str]) -> int:
    """Entry for ``loopreg layers`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="loopreg layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hugging Face folder, .gguf file, loopreg model folder or hub id")
    parser.add_argument("--text", required=True, help="calibration text: .txt/.jsonl/.json/.parquet file or folder")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"calibration tokens (default {DEFAULT_TOKENS})")
    parser.add_argument("--loops", type=int, default=2, help="loop count of the proposed thinking block (default 2)")
    parser.add_argument("--think-layers", type=int, help="narrow the thinking block to the N consecutive layers "
                                                         "between the knees that turn the stream least")
    parser.add_argument("--json", help="write the curves, split, spec and layer map here")
    parser.add_argument("--png", help="plot both curves with the split marked here")
    args = parser.parse_args(argv)
    if args.loops < 1:
        raise UserError(f"--loops must be an integer >= 1, got {args.loops}")
    _layers(args)
    return 0


def _layers(args: argparse.Namespace) -> None:
    from loopreg.loading import load

    ids = calibration_tokens(args.source, args.text, args.tokens)  # a short text fails before the slow load
    model = load(args.source)
    started = time.perf_counter()
    analysis = layer_analysis(model, token_windows(model, ids))
    seconds = time.perf_counter() - started
    split = analysis.split(args.think_layers)
    print_analysis(analysis, split, args.loops)
    rows = [("source", str(args.source)), ("calibration", f"{analysis.tokens:,} tokens of {args.text}"),
            ("time", f"{seconds:.2f} s")]
    if args.json:
        report = {"source": str(args.source), **analysis.to_json(args.loops, args.think_layers)}
        with writing(args.json):
            rows.append(("json", str(write_json(args.json, report))))
    if args.png:
        with writing(args.png):
            rows.append(("png", str(write_png(args.png, analysis, split, title=Path(str(args.source)).name))))
    print_table("layer analysis", rows)


def print_analysis(analysis: LayerAnalysis, split: Split, loops: int) -> None:
    """The per-layer rich table and the proposed spec + layer map for ``loops``."""
    table = Table(title="layers", title_justify="left")
    for column in ("layer", "angular distance", "block influence", "part"):
        table.add_column(column, justify="right" if column != "part" else "left")
    for layer, (distance, influence) in enumerate(zip(analysis.angular_distance, analysis.block_influence)):
        table.add_row(str(layer), f"{distance:.4f}", f"{influence:.4f}", split.part(layer))
    Console().print(table)
    print_table("proposal", [
        ("split", f"encoder {split.encoder}, thinking {split.thinking}, decoder {split.decoder}"),
        ("spec", str(split.spec(loops))), ("layer map", split.layer_map())])


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON atomically (a half-written file never takes ``path``'s place)."""
    return _write_atomic(path, lambda file: file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def write_png(path: str | Path, analysis: LayerAnalysis, split: Split, title: str = "") -> Path:
    """Both curves against the layer index, the thinking block shaded and the split marked; atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = range(len(analysis.angular_distance))
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: no pyplot, no global backend, works headless
    axes = figure.add_subplot()
    axes.plot(layers, analysis.angular_distance, marker="o", label="angular distance arccos(cos)/π")
    axes.plot(layers, analysis.block_influence, marker="s", label="block influence 1 − cos")
    first, last = split.encoder, split.encoder + split.thinking - 1
    axes.axvspan(first - 0.5, last + 0.5, color="tab:green", alpha=0.15, label=f"thinking {first}-{last}")
    for boundary in (first - 0.5, last + 0.5):
        axes.axvline(boundary, color="tab:green", linestyle="--", linewidth=1)
    axes.set(xlabel="layer", ylabel="mean over tokens", title=f"{title} ({analysis.tokens:,} tokens)".strip())
    axes.legend(fontsize="small")
    return _write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120))


def _write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return path
