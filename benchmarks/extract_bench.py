"""Extraction benchmark: the model's own prefill (floor), kvpipe, and a hand-written loop.

Why in one process: speed figures are only comparable when they share the machine, the
model, the images and the batch size, so all runs reuse one loaded model and one image set,
and report ratios to each other rather than absolute numbers alone.

  floor-hf      transformers' prefill through the last image token, batched, no capture, no I/O
  floor-kvpipe  the same prefill with kvpipe's equivalent kernels (ModelAdapter.accelerate)
  kvpipe        full extraction into a local store (loading, preprocessing, capture, writes),
                end to end; kvpipe-steady: the same run from the end of its first part on;
                kvpipe-lz4bit / kvpipe-int8 / kvpipe-int4 / kvpipe-pca: the same with the lz4
                bit-shuffle codec (larger stores, faster encoding) / the lossy int8 / int4 / pca
                encodings; --views base
                stores an any-resolution model's base view only (every run)
  naive         what one writes by hand: batch size 1, full forward with use_cache, slice
                past_key_values at image positions, torch.save one file per image

A vision encoder (``--model dinov2-base``, ...) is measured the same way: its floor is the
encoder's forward, kvpipe stores every block's output (``hidden``), and the naive loop runs
one image at a time with ``output_hidden_states`` and saves the patch tokens.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kvpipe.benchmarks.common import (device_name, drop_page_cache, forward, settle, synthetic_images,
                                      synthetic_options, timed)
from kvpipe.pipeline.models.capture import Selection, model_cache
from kvpipe.pipeline.extraction.worker import PartWorker
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.extraction.config import parse_index_spec, parse_kinds
from kvpipe.device import resolve_device
from kvpipe.pipeline.models.loading import load_model, resolve_dtype
from kvpipe.store.encoding import stored_dim
from kvpipe.store.schema import HIDDEN, POST_PROJ


@dataclass
class BenchConfig:
    model: str = "qwen25vl"
    init: str = "random"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    device: str = "auto"  # auto: the first GPU when there is one
    size: int = 448  # square synthetic images of size x size pixels
    images: int = 64
    batch_size: int = 8
    part_size: int = 32
    naive_images: int = 16
    store_dtype: str | None = None
    codec: str = "zstd"
    views: str = "all"  # all | base (an any-resolution model's base view only)
    kinds: str | None = None  # None: keys,values for an MLM, hidden for a vision encoder
    layers: str = "all"
    heads: str = "all"
    out: str | None = None  # store directory (default: a temporary directory, removed after)
    disk_probe_bytes: int = 1 << 30  # written and fsync'd to measure the disk beside the store
    runs: tuple[str, ...] = ("floor-hf", "floor-kvpipe", "kvpipe", "naive")
    # extraction runs repeated in rounds of alternating order (A B, B A, ...), each reported as the
    # median of its rounds: on an H100 the order of two runs moved their steady rates by up to 25%
    rounds: int = 1


@dataclass
class BenchResult:
    config: dict[str, Any]
    device_name: str
    image_tokens: int
    images_per_s: dict[str, float] = field(default_factory=dict)  # the median of the rounds
    rounds: dict[str, list[float]] = field(default_factory=dict)  # images/s of each round, in order
    rounds_seconds: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_per_image_raw: float = 0.0
    bytes_per_image_stored: float = 0.0
    stored_per_image: dict[str, float] = field(default_factory=dict)  # per kvpipe run (kvpipe, kvpipe-int8)
    read: dict[str, float] = field(default_factory=dict)
    disk_write_mb_s: float = 0.0  # sequential write + fsync of 1 GiB where the store lives

    def ratios(self) -> dict[str, float]:
        ips = self.images_per_s
        out = {}
        for a, b in (("kvpipe", "floor-hf"), ("kvpipe", "floor-kvpipe"), ("kvpipe", "naive"),
                     ("kvpipe-steady", "floor-hf"), ("kvpipe-steady", "floor-kvpipe"), ("kvpipe-steady", "naive"),
                     ("kvpipe-lz4bit-steady", "floor-hf"), ("kvpipe-lz4bit-steady", "naive"),
                     ("kvpipe-int8-steady", "floor-hf"), ("kvpipe-int8-steady", "naive"),
                     ("kvpipe-int4-steady", "floor-hf"), ("kvpipe-int4-steady", "naive"),
                     ("kvpipe-pca-steady", "floor-hf"),
                     ("floor-kvpipe", "floor-hf")):
            if a in ips and b in ips and ips[b] > 0:
                out[f"{a} / {b}"] = ips[a] / ips[b]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios()}


def bench_extract(cfg: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run the selected runs on the same images and model; see the module docstring."""
    device_spec = resolve_device(cfg.device)
    cfg = replace(cfg, device=device_spec, dtype=resolve_dtype(cfg.dtype, device_spec))  # what ran, in the result
    adapter = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, init=cfg.init)
    device = adapter.device
    if cfg.kinds is None:  # what the paper's probes read: K/V of an MLM, block outputs of an encoder
        cfg = replace(cfg, kinds=",".join(k for k in adapter.kinds if k != POST_PROJ))
    ds_opts = synthetic_options(cfg.images, cfg.size)
    images = synthetic_images(cfg.images, cfg.size)
    batches = [adapter.preprocess(images[i:i + cfg.batch_size]) for i in range(0, len(images), cfg.batch_size)]
    n_tok = int(batches[0].views(cfg.views).layouts[0].positions.numel())  # tokens stored per image
    name = device_name(device)
    result = BenchResult(asdict(cfg), name, n_tok)
    log(f"{cfg.model} ({cfg.init}, {cfg.dtype}) on {name}: {len(images)} images {cfg.size}x{cfg.size}, "
        f"{n_tok} image tokens, batch {cfg.batch_size}")

    @torch.inference_mode()
    def prefill() -> None:
        for b in batches:
            forward(adapter, b, device)

    def record(run: str, seconds: float, n: int) -> None:  # a run's figures: the median of its rounds
        result.rounds.setdefault(run, []).append(n / seconds)
        result.rounds_seconds.setdefault(run, []).append(seconds)
        result.images_per_s[run] = statistics.median(result.rounds[run])
        result.seconds[run] = statistics.median(result.rounds_seconds[run])
        log(f"  {run:13s} {n / seconds:8.2f} img/s  ({n} images, {seconds:.2f} s)")

    if "floor-hf" in cfg.runs:
        timed(lambda: forward(adapter, batches[0], device), device)  # warm-up
        record("floor-hf", timed(prefill, device), len(images))
    tmp = Path(cfg.out) if cfg.out else Path(tempfile.mkdtemp(prefix="kvpipe-bench-"))
    if "naive" in cfg.runs:  # with transformers' own kernels, as a hand-written loop would run
        record("naive", naive_loop(adapter, images[:cfg.naive_images], tmp / "naive", device), cfg.naive_images)
    adapter.accelerate()
    if "floor-kvpipe" in cfg.runs:
        timed(lambda: forward(adapter, batches[0], device), device)  # warm-up
        record("floor-kvpipe", timed(prefill, device), len(images))
    try:
        extract_runs = (("kvpipe", cfg.store_dtype, cfg.codec), ("kvpipe-lz4bit", cfg.store_dtype, "lz4bit"),
                        ("kvpipe-int8", "int8", cfg.codec), ("kvpipe-int4", "int4", cfg.codec),
                        ("kvpipe-pca", "pca", cfg.codec))
        if any(run in cfg.runs for run, _, _ in extract_runs):
            # a short extraction first, as the floors get a warm-up batch, so the first timed
            # run does not also pay the process's one-time costs (encoder threads, the text
            # pass's first kernel compile). Measured on an H100: the first timed run was still
            # 10-20% slower after this alone; with settle before each run, 6% (BENCHMARKS.md)
            warm = replace(cfg, images=min(cfg.images, 2 * cfg.part_size))
            _extract_run(warm, "warm-up", cfg.store_dtype, cfg.codec, adapter, tmp / "warm-up", ds_opts,
                         lambda *a: None, BenchResult({}, "", 0), lambda line: None, measure_disk=False)
            shutil.rmtree(tmp / "warm-up", ignore_errors=True)
            # and the timed runs' text-query pass, whose shapes (the full dataset's queries)
            # the warm-up's do not cover: its first run compiles kernels for them (0.8-1.8 s
            # on an H100), once per process, as the floors' warm-up batch compiles theirs
            worker = PartWorker(replace(_extract_config(cfg, tmp / "warm-up", cfg.store_dtype, cfg.codec, ds_opts),
                                        fast_kernels=False), adapter=adapter)  # already accelerated above
            if adapter.encodes_text and worker.data.queries:
                worker.text()
        selected = [r for r in extract_runs if r[0] in cfg.runs]
        for i in range(cfg.rounds):
            if cfg.rounds > 1:
                log(f"  round {i + 1} of {cfg.rounds}")
            for run, store_dtype, codec in (selected if i % 2 == 0 else selected[::-1]):
                settle(device)
                _extract_run(cfg, run, store_dtype, codec, adapter, tmp / run, ds_opts, record, result, log,
                             measure_disk=i == 0)
        for run, rates in result.rounds.items():
            if len(rates) > 1:
                log(f"  {run:13s} median of {len(rates)} rounds {result.images_per_s[run]:8.2f} img/s "
                    f"(rounds: {', '.join(f'{r:.2f}' for r in rates)})")
        sel = Selection(parse_index_spec(cfg.layers, adapter.n_layers, "--layers"),
                        parse_index_spec(cfg.heads, adapter.n_kv_heads, "--heads"), parse_kinds(cfg.kinds))
        store_dtype = cfg.store_dtype or cfg.dtype
        itemsize = {"bfloat16": 2, "float16": 2, "int8": 1, "int4": 1, "pca": 1}.get(store_dtype, 4)
        kv = sum(k in sel.kinds for k in ("keys", "values", HIDDEN))
        result.bytes_per_image_raw = (len(sel.layers) * len(sel.heads) * n_tok * kv * itemsize
                                      * stored_dim(adapter.head_dim, store_dtype))
    finally:
        if not cfg.out:
            shutil.rmtree(tmp, ignore_errors=True)
    for k, v in result.ratios().items():
        log(f"  {k:28s} {v:6.2f} x")
    log(f"  features per image: {result.bytes_per_image_raw / 1e6:.1f} MB raw, "
        f"{result.bytes_per_image_stored / 1e6:.1f} MB stored "
        f"(compression {result.bytes_per_image_raw / max(result.bytes_per_image_stored, 1):.2f} x)")
    for run, stored in result.stored_per_image.items():
        if not result.disk_write_mb_s:
            break
        disk_rate = result.disk_write_mb_s * 1e6 / stored
        bound = min(result.images_per_s.get("floor-hf", disk_rate), disk_rate)
        label = "min(floor-hf, disk)" if "floor-hf" in result.images_per_s else "disk"
        log(f"  {run}: {stored / 1e6:.1f} MB stored per image; disk writes {result.disk_write_mb_s:.0f} MB/s "
            f"with fsync -> {disk_rate:.1f} img/s; {run} / {label} = "
            f"{result.images_per_s.get(run, 0) / bound:.2f} x, {run}-steady / {label} = "
            f"{result.images_per_s.get(f'{run}-steady', 0) / bound:.2f} x")
    for mode in ("cold", "warm"):
        if f"{mode}_store_mb_s" in result.read:
            st, raw = result.read[f"{mode}_store_mb_s"], result.read[f"{mode}_raw_mb_s"]
            log(f"  read one (layer, head, kind), {mode} cache: FeatureStore.read {st:.0f} MB/s of stored bytes, "
                f"raw read of the same files {raw:.0f} MB/s ({st / raw:.2f} x)")
    return result



def _extract_run(cfg: BenchConfig, run: str, store_dtype: str | None, codec: str, adapter: Any, store: Path,
                 ds_opts: dict[str, Any], record: Callable[[str, float, int], None], result: BenchResult,
                 log: Callable[[str], None], measure_disk: bool = True) -> None:
    """One ``kvpipe extract`` into ``store``, recorded as ``run`` and ``run``-steady."""
    shutil.rmtree(store, ignore_errors=True)
    ecfg = _extract_config(cfg, store, store_dtype, codec, ds_opts)
    stamps: list[tuple[float, int]] = []
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        stamps.append((time.perf_counter(), done[0]))

    res = extract(ecfg, adapter=adapter, progress=progress)
    t_end = time.perf_counter()
    record(run, res.seconds, res.images_ok)
    # steady rate: from the end of the first part to the end of the run (model already
    # loaded, store created, pipeline full), the rate a long extraction runs at
    first = next(((t, n) for t, n in stamps if n >= cfg.part_size), None)
    if first is not None and res.images_ok > first[1]:
        record(f"{run}-steady", t_end - first[0], res.images_ok - first[1])
    result.seconds.update({f"{run}.{k}": v for k, v in res.timings.items()})
    log("    driver time: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))
    stored = sum(p.stat().st_size for p in (store / "parts").rglob("*") if p.is_file())
    result.stored_per_image[run] = stored / max(res.images_ok, 1)
    if measure_disk and (run == "kvpipe" or not result.bytes_per_image_stored):
        result.bytes_per_image_stored = result.stored_per_image[run]
        result.read = bench_read(store)
        result.disk_write_mb_s = disk_write_rate(store.parent, cfg.disk_probe_bytes)
    if not cfg.out:
        shutil.rmtree(store, ignore_errors=True)  # the next run's disk is as empty as this one's was


def _extract_config(cfg: BenchConfig, store: Path, store_dtype: str | None, codec: str,
                    ds_opts: dict[str, Any]) -> ExtractConfig:
    return ExtractConfig(model=cfg.model, dataset="synthetic", out=str(store), limit=cfg.images,
                         init=cfg.init, dtype=cfg.dtype, device=cfg.device, kinds=cfg.kinds,
                         layers=cfg.layers, heads=cfg.heads, store_dtype=store_dtype,
                         batch_size=cfg.batch_size, part_size=cfg.part_size, dataset_options=ds_opts,
                         codec=codec, views=cfg.views, command="kvpipe bench extract")


def _naive_mlm(adapter: Any, device: torch.device) -> Callable[[Any], dict[str, list[torch.Tensor]]]:
    """One image: chat prompt, full forward (LM head included), the cache sliced at the image tokens."""
    proc = adapter.processor
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe the image."}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def step(img: Any) -> dict[str, list[torch.Tensor]]:
        inputs = proc(text=[text], images=[img], return_tensors="pt").to(device)
        outputs = adapter.model(**inputs, use_cache=True)
        pos = (inputs["input_ids"][0] == adapter.image_token_id).nonzero().squeeze(1)
        pkv = model_cache(outputs)
        return {"keys": [layer.keys[0][:, pos].cpu() for layer in pkv.layers],
                "values": [layer.values[0][:, pos].cpu() for layer in pkv.layers]}
    return step


def _naive_encoder(adapter: Any, device: torch.device) -> Callable[[Any], dict[str, list[torch.Tensor]]]:
    """One image: the encoder's forward with every block's output, the patch tokens kept."""
    def step(img: Any) -> dict[str, list[torch.Tensor]]:
        inputs = adapter.processor(images=[img], return_tensors="pt").to(device)
        states = adapter.model(**inputs, output_hidden_states=True).hidden_states
        return {HIDDEN: [h[0, adapter.prefix_tokens:].cpu() for h in states[1:]]}
    return step


@torch.inference_mode()
def naive_loop(adapter: Any, images: list, out: Path, device: torch.device) -> float:
    """Batch size 1, one forward and one torch.save per image (after one warm-up image)."""
    out.mkdir(parents=True, exist_ok=True)
    step = (_naive_encoder if HIDDEN in adapter.kinds else _naive_mlm)(adapter, device)

    def run(todo: list) -> None:
        for i, img in enumerate(todo):
            torch.save(step(img), out / f"{i:06d}.pt")

    run(images[:1])  # warm-up
    return timed(lambda: run(images), device)


def disk_write_rate(folder: Path, total: int = 1 << 30, block: int = 64 << 20) -> float:
    """MB/s of writing ``total`` bytes sequentially and fsync'ing them (the disk's commit rate)."""
    path = folder / "disk-probe.bin"
    payload = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(total // block):
            fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / 1e6


def bench_read(store_path: Path, repeats: int = 3) -> dict[str, float]:
    """Reading one (layer, head, kind) across the store vs reading the same chunk files raw.

    Each (layer, head) of a part is one chunk file, so "the same bytes" are exactly those
    files. Measured cold (page cache dropped before each read, where permitted) and warm.
    """
    from kvpipe.store import FeatureStore

    meta = FeatureStore.open(store_path).meta
    kind = "values" if "values" in meta.kinds else meta.kinds[0]
    li, hi = len(meta.layers) // 2, 0
    files = sorted((store_path / "parts").glob(f"*/{kind}/c/{li}/{hi}/*/*"))
    nbytes = sum(f.stat().st_size for f in files)
    out: dict[str, float] = {"disk_bytes": float(nbytes), "files": float(len(files))}
    for mode in ("cold", "warm"):
        if mode == "cold" and not drop_page_cache():
            continue
        t_store, t_raw = [], []
        for _ in range(repeats):
            if mode == "cold":
                drop_page_cache()
            store = FeatureStore.open(store_path)
            t0 = time.perf_counter()
            store.read(kind, meta.layers[li], meta.heads[hi])
            t_store.append(time.perf_counter() - t0)
            if mode == "cold":
                drop_page_cache()
            t0 = time.perf_counter()
            for f in files:
                with open(f, "rb") as fh:
                    fh.read()
            t_raw.append(time.perf_counter() - t0)
        out[f"{mode}_store_mb_s"] = nbytes / statistics.median(t_store) / 1e6
        out[f"{mode}_raw_mb_s"] = nbytes / statistics.median(t_raw) / 1e6
    return out
