"""``kvpipe show``: one self-contained HTML page of a probe's predictions over the images.

Why a single file: it opens from disk in any browser, travels by e-mail or as a CI artifact,
and needs no server; every picture is an inline base64 PNG. The predictions come from what
``kvpipe probe`` saved (``<results>/<task>/predictions``); a target it did not save is
predicted here from the store, nothing written. An inline script marks the page with how
many of its pictures decoded (``data-images`` / ``data-rendered`` on ``<body>``), which the
tests read from a headless browser.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvpipe.errors import UsageError
from kvpipe.probes.base import PROBES, Target
from kvpipe.probes.figures import png_bytes
from kvpipe.probes.gallery import (Picture, load_saved, pca_pictures, pick_saved, prediction_pictures,
                                   record_target, saved_records, shown_images)
from kvpipe.probes.images import ImageSource
from kvpipe.probes.predictions import target_label
from kvpipe.probes.runner import results_dir
from kvpipe.provenance import read_run_json
from kvpipe.store import FeatureStore

MIN_HEIGHT = 120  # pixels a picture is shown at, at least (an integer zoom)
RENDER_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-rendered", String(ok));
});
</script>"""


def build_show_page(store_path: str | Path, task: str, target: Target | None = None, out: str | Path | None = None,
                    results: str | Path | None = None, limit: int = 8, device: str = "auto") -> Path:
    """Write the page of ``task``'s predictions at ``target`` (default: the saved best image
    values); returns its path (default ``<results>/<task>/show.html``)."""
    store = FeatureStore.open(store_path)
    probe_cls = PROBES.get(task)
    if not probe_cls.prediction_format:
        raise UsageError(f"--task {task} makes no per-image predictions to show; choose one of "
                         f"{', '.join(n for n, c in PROBES.items() if c.prediction_format)}")
    if limit < 1:
        raise UsageError(f"--limit {limit} must be at least 1")
    run_dir = (Path(results) if results is not None else results_dir(store.root)) / task
    records = saved_records(run_dir)
    record = pick_saved(records, target)
    params = _params(run_dir)
    if record is not None:
        preds, target, source = load_saved(run_dir, record), record_target(record), f"saved in {run_dir / record['path']}"
    else:
        if target is None:
            raise UsageError(f"no saved predictions of {task} under {run_dir}; run kvpipe probe --task {task} "
                             f"--store {store.root} first, or name a target with --layer, --head and --kind")
        _check_target(store, target, probe_cls)
        probe = probe_cls(store, params, device=device)
        preds, source = probe.predictions(target), "predicted from the store (not saved)"
    images = ImageSource(store)
    pictures = prediction_pictures(store, preds, images, limit)
    pca_target = Target("keys", target.layer, target.head) if target.kind == "values" and \
        "keys" in store.meta.kinds else target
    pca = pca_pictures(store, pca_target, shown_images(store, preds, min(limit, 4)), images)
    page = _page(store, task, target, source, _score(run_dir, probe_cls, target), pictures, pca, images.problem)
    path = Path(out) if out is not None else run_dir / "show.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {path}: the page is HTML; name a .html file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _params(run_dir: Path) -> dict[str, Any]:
    return dict((read_run_json(run_dir) or {}).get("params") or {})


def _check_target(store: FeatureStore, target: Target, probe_cls: Any) -> None:
    meta = store.meta
    kinds = probe_cls.scored_kinds()
    if target.kind not in kinds or target.kind not in meta.kinds:
        raise UsageError(f"--kind {target.kind}: {probe_cls.name} scores {', '.join(k for k in kinds if k in meta.kinds)}"
                         f" of this store")
    if target.kind != "post_proj" and (target.layer not in meta.layers or target.head not in meta.heads):
        raise UsageError(f"--layer {target.layer} --head {target.head}: not in the store (layers "
                         f"{min(meta.layers)}-{max(meta.layers)}, KV heads {', '.join(map(str, meta.heads))})")


def _score(run_dir: Path, probe_cls: Any, target: Target) -> str:
    """The target's primary metric from the results table, when there is one."""
    try:
        rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    except (OSError, pa.ArrowException):
        return ""
    for r in rows:
        if (r["kind"], r["layer"], r["head"], r["metric"]) == (target.kind, target.layer, target.head,
                                                                probe_cls.primary_metric):
            return f"{probe_cls.primary_metric} = {r['value']:.4g}"
    return ""


def _img(p: Picture) -> str:
    data = base64.b64encode(png_bytes(p.image)).decode("ascii")
    e = html.escape
    zoom = max(1, MIN_HEIGHT // max(1, p.image.height))  # tiny token grids shown larger, pixels kept sharp
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{e(p.title, quote=True)}" '
            f'width="{p.image.width * zoom}" height="{p.image.height * zoom}"><figcaption><b>{e(p.title)}</b>'
            f"{'<br>' + e(p.caption) if p.caption else ''}</figcaption></figure>")


def _page(store: FeatureStore, task: str, target: Target, source: str, score: str, pictures: list[Picture],
          pca: list[Picture], problem: str) -> str:
    e = html.escape
    meta = store.meta
    title = f"{task} at {target_label(target)}: {meta.model.name} on {meta.dataset.name}"
    facts = [("store", str(store.root)), ("task", task), ("target", target_label(target)), ("score", score),
             ("predictions", source)]
    if problem:
        facts.append(("images", problem))
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts if v)
    body = [f"<h1>{e(title)}</h1>", f"<table>{rows}</table>", "<h2>Predictions</h2>",
            "".join(_img(p) for p in pictures) or "<p>nothing to show</p>"]
    if pca:
        body += ["<h2>PCA of image tokens as colour</h2>", "".join(_img(p) for p in pca)]
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}figure{display:inline-block;"
             "margin:0 1em 1em 0;vertical-align:top}img{max-width:100%;height:auto;image-rendering:pixelated}"
             "figcaption{font-size:85%;color:#444;max-width:40em}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + f"\n{RENDER_CHECK}\n</body></html>\n")



def parse_target(layer: int | None, head: int | None, kind: str | None) -> Target | None:
    """``--layer/--head/--kind`` -> a target (None when none is given); post_proj takes neither."""
    if layer is None and head is None and kind is None:
        return None
    kind = (kind or "values").replace("-", "_")
    if kind == "post_proj":
        if layer is not None or head is not None:
            raise UsageError("--kind post_proj is the baseline of no layer or head; drop --layer and --head")
        return Target("post_proj")
    if layer is None or head is None:
        raise UsageError(f"--kind {kind} needs both --layer and --head (or none of them: the saved best target)")
    return Target(kind, int(layer), int(head))
