"""Sweep a probe over every (layer, head, kind) of a store, cache, tabulate, plot.

Why: the expensive part (the model) ran once; this loop must be cheap, repeatable and
instant when repeated. Results are cached under the store by a key made of the feature set's
fingerprint, its committed parts, the probe, its version and its parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Selection, Target
from kvpipe.probes.executor import PROBE_EXECUTORS, ExecutorOptions, SweepJob, TargetCache
from kvpipe.probes.predictions import SaveRequest, chosen_targets, save_all
from kvpipe.provenance import RUN_FILE, read_run_json
from kvpipe.store import FeatureStore

COLUMNS = ["model", "dataset", "task", "layer", "head", "kind", "metric", "value"]
SCHEMA = pa.schema([("model", pa.string()), ("dataset", pa.string()), ("task", pa.string()),
                    ("layer", pa.int64()), ("head", pa.int64()), ("kind", pa.string()),
                    ("metric", pa.string()), ("value", pa.float64())])
DRAW_PLOTS = True  # run_probe's default for ``plots`` (the test suite turns it off where figures are not checked)
SCORED_ROWS = "kvpipe.scored_rows"  # parquet metadata of the cache file: rows before summarize()'s
DEVICE = "kvpipe.device"  # parquet metadata of the cache file: where the scores were computed
SELECTION = "_selection"  # the cache key's entry for a sweep of a subset


@dataclass
class ProbeRun:
    task: str
    table: pa.Table
    out_dir: Path
    plots: list[Path]
    cached: bool
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # read_s, read_wait_s, compute_s, summary_s
    predictions: list[dict[str, Any]] = field(default_factory=list)  # targets saved: kind, layer, head, path, why
    skipped: list[str] = field(default_factory=list)  # stored kinds left out of the sweep, with why

    def best(self, metric: str, kind: str = "values") -> dict[str, Any] | None:
        rows = [r for r in self.table.to_pylist() if r["metric"] == metric and r["kind"] == kind
                and not np.isnan(r["value"])]
        return max(rows, key=lambda r: r["value"]) if rows else None


def cache_key(store: FeatureStore, task: str, version: int, params: dict[str, Any]) -> str:
    blob = json.dumps({"fs": store.meta.fingerprint(), "parts": store.committed_parts, "task": task,
                       "version": version, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def coverage(store: FeatureStore) -> dict[str, int]:
    """How much of the planned feature set the store holds: images extracted (ok, in committed
    parts) of the dataset's images, and parts committed."""
    return {"images": len(store.images()), "images_total": store.meta.n_images,
            "parts": len(store.committed_parts), "parts_total": store.n_parts}


def check_complete(store: FeatureStore, allow_incomplete: bool = False) -> dict[str, int]:
    """A one-line StoreError for a store with parts still pending, unless allowed; returns
    the coverage either way."""
    cov = coverage(store)
    if cov["parts"] < cov["parts_total"] and not allow_incomplete:
        raise StoreError(f"store {store.root} is incomplete: {cov['parts']} of {cov['parts_total']} parts committed "
                         f"({cov['images']} of {cov['images_total']} images); finish it by rerunning the same "
                         f"kvpipe extract, or pass --allow-incomplete to probe the images it holds")
    return cov


def run_probe(store_path: str | Path, task: str, params: dict[str, Any] | None = None,
              out_dir: str | Path | None = None, use_cache: bool = True,
              progress: Callable[[int, int], None] | None = None, device: str = "auto",
              selection: Selection | None = None, prefetch: bool = True, allow_incomplete: bool = False,
              executor: str = "local", options: ExecutorOptions | None = None,
              save_predictions: str | SaveRequest = "best", plots: bool | None = None) -> ProbeRun:
    """Run ``task`` on the store; ``progress(done, total)`` after each target.

    ``device``: where the probe computes (``auto``, ``cpu``, ``cuda[:N]``, or ``numpy``, the
    reference code; ``probes/device.py``); recorded in run.json, not in the cache key (every
    device gives the same scores, tests/probes/test_device_paths.py). ``selection``: the
    (layer, head, kind) subset to sweep (part of the cache key). ``prefetch``: read the next
    target's features in a thread while the current one computes. A store with parts still
    pending is refused (``allow_incomplete`` probes what it holds); the coverage goes into
    run.json and the results' parquet metadata. ``executor``: who scores the targets
    (``local``, or ``ray``: actors over a Ray cluster, ``options`` their number and address;
    ``probes/executor.py``); finished targets are cached one by one, so a sweep killed midway
    recomputes only the targets it had not finished. ``save_predictions``: ``best`` (the best
    target of each kind), ``all``, ``none`` or ``L:H:K,...`` (``probes/predictions.py``); written
    under ``OUT/predictions/`` by probes that predict masks or points, recorded in run.json.
    ``plots``: draw the figures (default ``DRAW_PLOTS``); without them a sweep writes its tables
    only, and a later cached run draws what the results folder lacks.
    """
    t0 = time.perf_counter()
    draw = DRAW_PLOTS if plots is None else plots
    store = FeatureStore.open(store_path)
    cov = check_complete(store, allow_incomplete)
    probe_cls = PROBES.get(task)
    why = probe_cls.unavailable(store.meta)
    if why:
        raise StoreError(f"store {store.root}: {why}")
    params = params or {}
    selection = selection or Selection()
    options = options or ExecutorOptions()
    scorer = PROBE_EXECUTORS.get(executor)()
    scorer.check(options)
    resolved = scorer.driver_device(device)
    request = SaveRequest.parse(save_predictions, store.meta)
    out = Path(out_dir) if out_dir else results_dir(store.root) / task
    out.mkdir(parents=True, exist_ok=True)
    key_params = {**probe_cls.defaults, **params}
    if selection != Selection():  # a full sweep keeps the key it always had
        key_params = {**key_params, SELECTION: selection.to_dict()}
    key = cache_key(store, task, probe_cls.version, key_params)
    cached_file = results_dir(store.root) / ".cache" / f"{task}-{key}.parquet"
    skipped = _skipped(probe_cls, store, selection)
    record = {"device": resolved, "selection": selection.to_dict(), "executor": executor, "skipped": skipped}
    if use_cache and cached_file.exists():
        table = pq.read_table(cached_file)
        computed_on = (table.schema.metadata or {}).get(DEVICE.encode(), b"").decode() or None
        figures = sorted(out.glob("*.png"))
        if not figures and draw:
            figures = _plots(probe_cls, store, params, table, out, selection)
        table = table.replace_schema_metadata(None)
        _write_table(table, out, cov)
        saved = _save_predictions(probe_cls, lambda: probe_cls(store, params, device=resolved, selection=selection),
                                  request, table, _swept(probe_cls, store, selection), out, key)
        _write_run_record(out, task, probe_cls, params, key, cached=True,
                          extra={**record, "device": computed_on, "coverage": cov, "predictions": saved})
        return ProbeRun(task, table, out, figures, True, time.perf_counter() - t0, predictions=saved["saved"],
                        skipped=skipped)
    target_cache = TargetCache(target_cache_dir(cached_file))
    if not use_cache:
        target_cache.clear()
    probe = probe_cls(store, params, device=resolved, selection=selection)
    probe.draw_plots = draw
    targets = probe.targets()
    if not targets:
        raise UsageError(f"task {task}: the selection {_describe(selection)} leaves nothing to score in {store.root}")
    # finished targets of an earlier, interrupted sweep are read back, not recomputed
    found = {t: target_cache.get(t) for t in targets} if use_cache else {}
    done: dict[Target, dict[str, float]] = {t: s for t, s in found.items() if s is not None}
    if progress and done:
        progress(len(done), len(targets))
    job = SweepJob(_location(store.root), task, params, device, selection, str(target_cache.root.resolve()))
    timings = {"read_s": 0.0, "read_wait_s": 0.0, "compute_s": 0.0}
    devices: set[str] = set()
    for res in scorer.score(probe, job, [t for t in targets if t not in done], options, prefetch):
        done[res.target] = res.scores
        devices.add(res.device)
        timings["read_s"] += res.read_s
        timings["read_wait_s"] += res.read_wait_s
        timings["compute_s"] += res.compute_s
        if progress:
            progress(len(done), len(targets))
    computed_on = ",".join(sorted(devices)) or resolved
    rows: list[dict[str, Any]] = []
    base = {"model": store.meta.model.name, "dataset": store.meta.dataset.name, "task": task}
    for tgt in targets:  # the targets' order, whoever scored them and when
        for metric, value in done[tgt].items():
            rows.append({**base, "layer": tgt.layer, "head": tgt.head, "kind": tgt.kind,
                         "metric": metric, "value": float(value)})
    n_scored = len(rows)
    t_sum = time.perf_counter()
    extra, extra_plots = probe.summarize(rows, out)
    rows.extend({**base, **r} for r in extra)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    cached_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached_file.with_suffix(".tmp")
    # the scored rows come first; the count lets a cached run redraw the probe's own plots
    pq.write_table(table.replace_schema_metadata({SCORED_ROWS: str(n_scored), DEVICE: computed_on}), tmp)
    tmp.rename(cached_file)
    _write_table(table, out, cov)
    t_pred = time.perf_counter()
    saved = _save_predictions(probe_cls, lambda: probe, request, table, targets, out, key)
    timings["predictions_s"] = time.perf_counter() - t_pred
    _write_run_record(out, task, probe_cls, params, key, cached=False,
                      extra={**record, "device": computed_on, "coverage": cov, "predictions": saved})
    figures = extra_plots + (_figure2(probe, store, table, out) if draw else [])
    timings["summary_s"] = time.perf_counter() - t_sum - timings["predictions_s"]
    return ProbeRun(task, table, out, figures, False, time.perf_counter() - t0, timings, saved["saved"], skipped)


def _swept(probe_cls: type[Probe], store: FeatureStore, selection: Selection) -> list[Target]:
    """The targets a sweep of ``probe_cls`` scores, without preparing the probe."""
    probe = probe_cls.__new__(probe_cls)
    probe.store, probe.selection = store, selection
    return probe.targets()


def _skipped(probe_cls: type[Probe], store: FeatureStore, selection: Selection) -> list[str]:
    """The stored kinds a sweep of ``probe_cls`` leaves out, with why, without preparing the probe."""
    probe = probe_cls.__new__(probe_cls)
    probe.store, probe.selection = store, selection
    return probe.skipped()


def _save_predictions(probe_cls: type[Probe], make_probe: Callable[[], Probe], request: SaveRequest,
                      table: pa.Table, swept: list[Target], out: Path, key: str) -> dict[str, Any]:
    """Write the requested targets' predictions (probes with a ``prediction_format``); what
    run.json records: the request, the results' cache key and, per target saved, its folder,
    format and why. Predictions of the same results and targets already in ``out`` are kept
    (a cached rerun stays instant)."""
    record: dict[str, Any] = {"request": request.text(), "cache_key": key, "saved": []}
    if not probe_cls.prediction_format:
        record["note"] = f"{probe_cls.name} makes no per-image predictions"
        return record
    chosen = chosen_targets(request, table.to_pylist(), probe_cls.primary_metric, swept)
    if request.mode == "targets":
        kinds = set(probe_cls.scored_kinds())
        bad = [t for t, _ in chosen if t.kind not in kinds]
        if bad:
            raise UsageError(f"--save-predictions {request.text()}: {probe_cls.name} scores "
                             f"{', '.join(sorted(kinds))}, not {bad[0].kind}")
    if not chosen:
        return record
    before = _previous_predictions(out)
    same = [(t.kind, t.layer, t.head) for t, _ in chosen] == [(r["kind"], r["layer"], r["head"])
                                                            for r in before.get("saved", [])]
    if same and before.get("cache_key") == key and all((out / r["path"]).is_dir() for r in before["saved"]):
        return {**record, "saved": before["saved"]}
    record["saved"] = save_all(make_probe(), chosen, out)
    return record


def _previous_predictions(out: Path) -> dict[str, Any]:
    """The predictions record of the run.json an earlier run left in ``out`` ({} when none)."""
    return dict((read_run_json(out) or {}).get("predictions") or {})


def target_cache_dir(cached_file: Path) -> Path:
    """The per-target cache of a sweep whose table is cached as ``cached_file``."""
    return cached_file.with_suffix(".targets")


def _location(root: Any) -> str:
    """The store as workers open it: an absolute path, or the URL."""
    return str(root.resolve()) if isinstance(root, Path) else str(root)


def _describe(selection: Selection) -> str:
    parts = [f"{k} {','.join(map(str, v))}" for k, v in selection.to_dict().items() if v is not None]
    return "; ".join(parts) or "(all)"


def results_dir(root: Any) -> Path:
    """Where a store's probe results and cache live: STORE/probes for a local store; for a store
    given by URL (object storage), ./kvpipe-probes/<host and path of the URL> on this machine."""
    if isinstance(root, Path):
        return root / "probes"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(root).split("://", 1)[-1]).strip("_") or "store"
    return Path("kvpipe-probes") / slug


COVERAGE = "kvpipe.coverage"  # parquet metadata of results.parquet: images / parts the results cover


def _write_table(table: pa.Table, out: Path, coverage: dict[str, int] | None = None) -> None:
    if coverage is not None:
        table = table.replace_schema_metadata({COVERAGE: json.dumps(coverage, sort_keys=True)})
    pq.write_table(table, out / "results.parquet")
    pacsv.write_csv(table, out / "results.csv")


def _write_run_record(out: Path, task: str, probe_cls: type[Probe], params: dict[str, Any], key: str,
                      cached: bool, extra: dict[str, Any] | None = None) -> None:
    """What produced results.parquet (parameters with defaults, probe version, cache key, the
    device that computed the scores, the selection swept and the store's coverage: images and
    parts extracted of those planned)."""
    record = {"task": task, "params": {**probe_cls.defaults, **params}, "probe_version": probe_cls.version,
              "cache_key": key, "from_cache": cached, **(extra or {})}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def _plots(probe_cls: type[Probe], store: FeatureStore, params: dict[str, Any], table: pa.Table,
           out: Path, selection: Selection) -> list[Path]:
    """Plots of a cached result in a new directory: the probe's own (from its summarize, given
    the cached scored rows) and the Figure-2 ones."""
    n_scored = (table.schema.metadata or {}).get(SCORED_ROWS.encode())
    if n_scored is not None and probe_cls.summarize is not Probe.summarize:
        probe = probe_cls(store, params, device="numpy", selection=selection)
        _, own = probe.summarize(table.slice(0, int(n_scored)).to_pylist(), out)
    else:
        probe = probe_cls.__new__(probe_cls)
        probe.store, probe.params, probe.selection = store, {**probe_cls.defaults, **params}, selection
        own = []
    return own + _figure2(probe, store, table, out)


def layer_head_matrix(table: pa.Table, metric: str, kind: str, layers: tuple[int, ...],
                      heads: tuple[int, ...]) -> np.ndarray:
    m = np.full((len(layers), len(heads)), np.nan)
    li = {l: i for i, l in enumerate(layers)}
    hi = {h: i for i, h in enumerate(heads)}
    for r in table.to_pylist():
        if r["metric"] == metric and r["kind"] == kind and r["layer"] in li and r["head"] in hi:
            m[li[r["layer"]], hi[r["head"]]] = r["value"]
    return m


def _figure2(probe: Probe, store: FeatureStore, table: pa.Table, out: Path) -> list[Path]:
    """Per-head heatmap + per-layer max line for each swept kind (the paper's Figure 2)."""
    from kvpipe.probes.plots import plot_layer_head

    metric = probe.primary_metric
    if not metric:
        return []
    base_rows = [r["value"] for r in table.to_pylist() if r["kind"] == "post_proj" and r["metric"] == metric]
    baseline = base_rows[0] if base_rows else None
    paths = []
    sel = getattr(probe, "selection", None) or Selection()
    layers = tuple(l for l in store.meta.layers if sel.has_layer(l))
    heads = tuple(h for h in store.meta.heads if sel.has_head(h))
    for kind in probe.kinds:
        if kind not in store.meta.kinds or not sel.has_kind(kind):
            continue
        # the swept layers and heads only (a cell of those not scored stays NaN)
        m = layer_head_matrix(table, metric, kind, layers, heads)
        title = f"{probe.name}: image {kind} of {store.meta.model.name} on {store.meta.dataset.name}"
        paths.append(Path(plot_layer_head(m, title, metric, out / f"{probe.name}-{kind}-{metric}.png", baseline,
                                          layers=layers, heads=heads)))
    return paths
