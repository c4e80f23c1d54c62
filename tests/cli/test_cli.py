"""The command line as a user meets it: listings, one-line errors (exit 2), info, verify, probes.

Commands run in this process through the entry point (``invoke``); a fresh interpreter only for the
end-to-end demo and for probes with transformers made unimportable before the interpreter starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from kvpipe.store import layout

from fixtures.cli import invoke, run_cli, run_cli_each


def one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def test_listings():
    assert "tiny-qwen25vl" in invoke("models").stdout
    assert "davis" in invoke("datasets").stdout
    out = invoke("tasks").stdout
    assert "temporal-corr" in out and "input-agnostic" in out


@pytest.mark.parametrize("args,fragments", [
    (["--model", "nope", "--dataset", "synthetic"], ["unknown model 'nope'", "tiny-qwen25vl"]),
    (["--model", "tiny-qwen25vl", "--dataset", "nope"], ["unknown dataset 'nope'", "davis"]),
    (["--model", "tiny-qwen25vl", "--dataset", "davis"], ["--data-root", "davis"]),
    (["--model", "tiny-qwen25vl", "--dataset", "davis", "--data-root", "/nonexistent/DAVIS"], ["/nonexistent/DAVIS"]),
    (["--model", "/nonexistent/ckpt", "--dataset", "synthetic"], ["/nonexistent/ckpt"]),
    (["--model", "tiny-qwen25vl", "--dataset", "synthetic", "--keys", "sideways"], ["--keys"]),
    (["--model", "tiny-qwen25vl", "--dataset", "synthetic", "--layers", "9"], ["--layers", "model has 2"]),
    (["--model", "tiny-qwen25vl", "--dataset", "synthetic", "--template", "fancy"], ["--template"]),
    (["--model", "tiny-qwen25vl", "--dataset", "synthetic", "--revision", "main"], ["--revision"]),
])
def test_extract_errors_are_one_line(tmp_path, args, fragments):
    out = tmp_path / "s"
    one_line_error(invoke("extract", *args, "--out", str(out), check=False), *fragments)
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"


def test_store_errors(tmp_path, synthetic_store):
    one_line_error(invoke("probe", "--task", "nope", "--store", str(synthetic_store), check=False),
                   "unknown task 'nope'", "temporal-corr")
    one_line_error(invoke("info", str(tmp_path), check=False), "not a kvpipe store")
    one_line_error(invoke("probe", "--task", "temporal-corr", "--store", str(tmp_path / "x"), check=False),
                   "does not exist")
    one_line_error(invoke("extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--prefix", "hi",
                          "--out", str(synthetic_store), check=False), "holds another feature set")


def test_info_and_verify(tmp_path, synthetic_store):
    out = invoke("info", str(synthetic_store)).stdout
    assert "tiny-qwen25vl" in out and "24 ok" in out and "post-rope" in out
    assert "3 parts verified" in invoke("verify", str(synthetic_store)).stdout
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_store, copy)
    shard = next(p for p in (layout.part_dir(copy, 2) / "keys").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x55
    shard.write_bytes(bytes(data))
    proc = invoke("verify", str(copy), check=False)
    assert proc.returncode == 1 and "p000002" in proc.stdout and "checksum" in proc.stdout


def test_recode_writes_a_lossy_copy_and_refuses_in_one_line(tmp_path, synthetic_store):
    """kvpipe recode: the lossless store again as pca (verified, its step in kvpipe info); a store
    that is not lossless, or a step without pca, is refused in one line before any work."""
    assert "recoded to pca" in invoke("recode", str(synthetic_store), "--out", str(tmp_path / "pca")).stdout
    assert "3 parts verified" in invoke("verify", str(tmp_path / "pca")).stdout
    assert "quant pca, scale step, step 0.35" in invoke("info", str(tmp_path / "pca")).stdout
    one_line_error(invoke("recode", str(tmp_path / "pca"), "--out", str(tmp_path / "x"), check=False),
                   "stored as pca, not in its compute dtype float32", "re-extract")
    one_line_error(invoke("recode", str(synthetic_store), "--out", str(tmp_path / "y"), "--store-dtype", "int4",
                          "--pca-step", "0.3", check=False), "--pca-step 0.3 needs --store-dtype pca")
    one_line_error(invoke("recode", str(synthetic_store), "--out", "s3://bucket/pca", check=False),
                   "on a local filesystem")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


BLOCK_TRANSFORMERS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_probes_run_without_transformers(tmp_path, synthetic_store):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_TRANSFORMERS)
    env = {"PYTHONPATH": str(site)}
    tasks = ("temporal-corr", "input-agnostic")
    check, *probes = run_cli_each(  # one interpreter: the block is in place for every command
        [["extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--limit", "1", "--out",
          str(tmp_path / "blocked")]]
        + [["probe", "--task", task, "--store", str(synthetic_store), "--out", str(tmp_path / task), "--no-cache"]
           for task in tasks], env=env)
    assert check.code != 0, "the block must really stop transformers"
    assert not check.imported["transformers"]
    for task, proc in zip(tasks, probes):
        assert proc.code == 0, proc.stdout + proc.stderr
        assert (tmp_path / task / "results.csv").exists(), proc.stdout


def test_probe_rerun_is_cached(tmp_path, synthetic_store):
    first = invoke("probe", "--task", "temporal-corr", "--store", str(synthetic_store), "--out", str(tmp_path / "a"))
    second = invoke("probe", "--task", "temporal-corr", "--store", str(synthetic_store), "--out", str(tmp_path / "b"))
    assert "temporal-corr (cached" in second.stdout, second.stdout
    assert (tmp_path / "a" / "results.csv").read_text() == (tmp_path / "b" / "results.csv").read_text()


def test_demo_runs_end_to_end(tmp_path):
    proc = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert "JF_mean" in proc.stdout and "l2_variance" in proc.stdout
    pngs = sorted(p.name for p in (tmp_path / "demo").rglob("*.png"))
    assert "input-agnostic-histogram.png" in pngs and "temporal-corr-values-JF_mean.png" in pngs
    # the report shows the saved predictions over the synthetic images (rendered again, not grey)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## temporal-corr: predictions at" in report and "## fg-seg: predictions at" in report
    frames = sorted((tmp_path / "demo" / "figures" / "temporal-corr").glob("*.png"))
    assert frames and f"](figures/temporal-corr/{frames[0].name})" in report
    from PIL import Image

    pixels = np.asarray(Image.open(frames[0]).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # image content, not a flat canvas with a mask
    assert (tmp_path / "demo" / "store" / "probes" / "temporal-corr" / "predictions").is_dir()
