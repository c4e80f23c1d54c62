"""What the benchmark scripts share: one argument parser that each script extends, and the
helpers they all need (the model and its batches of synthetic images, timing with a device
sync, results printed and written as JSON).

Each script builds its parser as

    parser = get_args_parser(__doc__, groups=("model", "device", "data", "out"))
    parser.add_argument(...)                      # its own flags
    parser.set_defaults(model="llava-ov", ...)    # its own defaults for shared flags

and runs as ``python -m kvpipe.benchmarks.NAME [flags]`` (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

GROUPS = ("model", "device", "data", "parts", "out")


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def get_args_parser(description: str | None = None, parents: Sequence[argparse.ArgumentParser] = (),
                    add_help: bool = True, groups: Iterable[str] = GROUPS) -> argparse.ArgumentParser:
    """The benchmarks' shared flags: ``--json`` (the results as JSON) and those of the named
    ``groups`` (the ones a script uses):

    model   --model, --init, --dtype (the model and its compute dtype)
    device  --device (default: cuda if available, else cpu)
    data    --images, --batch-size, --image-size, --seed (synthetic images)
    parts   --part-size (images per store part)
    out     --out/--dir (where the benchmark writes its files)
    """
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown flag groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
    doc = (description or "").strip()
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None, parents=list(parents),
                                     add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1] if "\n\n" in doc else None)
    shared = parser.add_argument_group("shared benchmark flags")
    if "model" in groups:
        shared.add_argument("--model", default="qwen25vl", help="model registry name (default: %(default)s)")
        shared.add_argument("--init", default="random", choices=("random", "pretrained"),
                            help="random: the full-size architecture with random weights (default: %(default)s)")
        shared.add_argument("--dtype", default="bfloat16", help="compute dtype (default: %(default)s)")
    if "device" in groups:
        shared.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if "data" in groups:
        shared.add_argument("--images", type=int, default=64, help="synthetic images (default: %(default)s)")
        shared.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
        shared.add_argument("--image-size", type=int, default=448, help="square image side in pixels "
                                                                        "(default: %(default)s)")
        shared.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    if "parts" in groups:
        shared.add_argument("--part-size", type=int, default=32, help="images per store part (default: %(default)s)")
    if "out" in groups:
        shared.add_argument("--out", "--dir", dest="out", type=Path, default=None,
                            help="directory for the files the benchmark writes")
    shared.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` with the device default resolved."""
    args = parser.parse_args(argv)
    if hasattr(args, "device") and args.device is None:
        args.device = default_device()
    return args


def comma_list(text: str, kind: Callable[[str], Any] = str) -> list:
    """'a,b,,c' -> [kind('a'), kind('b'), kind('c')]."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def require_cuda(device: str, what: str) -> None:
    """Stop with a one-line message where a benchmark needs a CUDA device and ``device`` is not one."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA device (got --device {device}"
                         f"{'' if torch.cuda.is_available() else ', and torch sees no GPU'})")


def synthetic_options(images: int, size: int, seed: int = 0) -> dict[str, Any]:
    """The synthetic dataset's options for ``images`` square images: videos of 8 frames."""
    return {"n_videos": -(-images // 8), "n_frames": 8, "width": size, "height": size, "seed": seed}


def synthetic_images(images: int, size: int, seed: int = 0) -> list:
    """``images`` synthetic PIL images of ``size`` x ``size`` pixels."""
    from kvpipe.pipeline.datasets import create_dataset

    dataset = create_dataset("synthetic", limit=images, **synthetic_options(images, size, seed))
    return [r.image() for r in dataset.records()]


def load_batches(args: argparse.Namespace, accelerate: bool = True) -> tuple[Any, list, list, Any]:
    """The model of ``args`` (``--model --init --dtype --device``) with kvpipe's kernels unless
    ``accelerate`` is false, ``--images`` synthetic images, those images preprocessed in batches
    of ``--batch-size``, and a selection of every layer's and head's keys and values."""
    from kvpipe.pipeline.models import load_model

    adapter = load_model(args.model, dtype=args.dtype, device=args.device, init=args.init)
    if accelerate:
        adapter.accelerate()
    images = synthetic_images(args.images, args.image_size, args.seed)
    batches = [adapter.preprocess(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)]
    return adapter, images, batches, every_kv(adapter)


def every_kv(adapter: Any) -> Any:
    """A selection of every layer's and KV head's keys and values."""
    from kvpipe.pipeline.models.capture import Selection

    return Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> float:
    """Seconds ``fn()`` takes under inference mode, the device synchronised before and after."""
    import torch

    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()
    sync(device)
    return time.perf_counter() - t0


def forward(adapter: Any, batch: Any, device: Any) -> None:
    """The floor's forward pass: an MLM's base model through the last image token, with its KV
    cache (no LM head); a vision encoder's forward."""
    from kvpipe.pipeline.models.capture import inputs_to_device
    from kvpipe.store.schema import HIDDEN

    inputs = inputs_to_device(batch.inputs, device, adapter.host_inputs)
    if HIDDEN in adapter.kinds:
        adapter.model(**inputs)
    else:
        adapter.model.model(**inputs, use_cache=True)


def drop_page_cache() -> bool:
    """Empty the OS page cache (root on Linux only) so reads come from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def evict_files(paths: Any) -> None:
    """Evict these files (or every file under a folder) from the page cache, so that their next
    read comes from the disk: what a probe sweep's next target meets. Unlike ``drop_page_cache``
    it needs no root and leaves the process's own code and libraries in memory (emptying the
    whole cache also evicts those, a cost a running sweep does not pay)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    for path in paths:
        for p in (path.rglob("*") if path.is_dir() else [path]):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def settle(device: Any) -> None:
    """The same start for every extraction run, as a fresh ``kvpipe extract`` process has:
    the CUDA allocator's cache of earlier runs' blocks released, dirty pages written and the
    page cache emptied (where permitted)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    drop_page_cache()


def device_name(device: Any) -> str:
    """The GPU's name, or the device's type."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def finish(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results`` to ``--json`` (when given) and return them: every script's ``main`` ends here."""
    path = getattr(args, "json", None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1, default=str))
        print(f"results written to {path}", flush=True)
    return results


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags, JSON-ready (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
