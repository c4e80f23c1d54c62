"""A researcher's first hour: instant answers, GPU-box defaults, one vocabulary, a wheel that runs anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvpipe
from kvpipe.cli.app import app
from kvpipe.errors import UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.extraction.config import default_part_size, validate
from kvpipe.store import FeatureStore

from fixtures.cli import invoke, run_cli_each

ROOT = Path(__file__).resolve().parents[2]

def _cases(store: str, tmp: Path) -> list[tuple[list[str], int, str]]:
    ex = ["extract", "--out", str(tmp / "never")]
    return [
        (["--help"], 0, "extract"),
        (["--version"], 0, f"kvpipe {kvpipe.__version__}"),
        (["models"], 0, "tiny-qwen25vl"),
        (["datasets"], 0, "pascal5i"),
        (["tasks"], 0, "temporal-corr"),
        (["info", store], 0, "tiny-qwen25vl"),
        (["status", "--store", store], 0, "done"),
        (["verify", store], 0, "ok"),
        ([*ex, "--model", "qwen25-vl", "--dataset", "synthetic"], 2, "unknown model 'qwen25-vl'"),
        ([*ex, "--model", "./no/such/dir", "--dataset", "synthetic"], 2, "no such directory"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "davsi"], 2, "unknown dataset 'davsi'"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "davis"], 2, "--data-root is required"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "davis", "--data-root", str(tmp / "nowhere")], 2,
         "does not exist"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--option", "fold=1"], 2, "has no option 'fold'"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--dtype", "fp64"], 2, "--dtype must be"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--layers", "3-1"], 2, "runs backwards"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--kinds", "queries"], 2, "--kinds"),
        ([*ex, "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--init", "randm"], 2, "--init must be"),
        (["probe", "--task", "temporal-cor", "--store", store], 2, "unknown task"),
    ]


def test_listings_and_usage_errors_import_no_model_code(synthetic_store, tmp_path):
    """Listing, inspecting and every one-line usage error answer without importing torch or transformers
    (what made `kvpipe models` take 9 s and a misspelt --model 15 s)."""
    cases = _cases(str(synthetic_store), tmp_path)
    ran = run_cli_each([args for args, _, _ in cases], env={"HF_HUB_OFFLINE": "1"})
    for (args, code, expected), (rc, stdout, stderr, imported) in zip(cases, ran):
        out = stdout + stderr
        assert rc == code, (args, out)
        assert expected in out, (args, out)
        assert imported == {"torch": False, "transformers": False}, (args, imported)
        if code == 2:
            assert out.strip().count("\n") == 0 and "Traceback" not in out, (args, out)
    assert not (tmp_path / "never").exists()


def test_part_size_follows_the_batch_size(tmp_path):
    assert [default_part_size(b) for b in (1, 3, 4, 5, 8, 64)] == [32, 30, 32, 30, 32, 64]
    out = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=5, batch_size=3))
    s = FeatureStore.open(out)
    assert s.meta.part_size == 30 and len(s.images()) == 5
    with pytest.raises(UsageError, match="multiple of --batch-size 3"):
        validate(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), batch_size=3, part_size=8))


def test_auto_device_and_dtype_record_what_ran(tmp_path):
    """On a machine without a GPU, auto is the CPU in float32; bf16 is a spelling of bfloat16."""
    out = tmp_path / "auto"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=2))
    assert FeatureStore.open(out).meta.compute_dtype == "float32"
    out = tmp_path / "bf16"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=2, dtype="bf16"))
    meta = FeatureStore.open(out).meta
    assert (meta.compute_dtype, meta.store_dtype) == ("bfloat16", "bfloat16")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: torch sees no CUDA device"):
            extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "c"), limit=2,
                                  device="cuda"))


def test_one_vocabulary_of_flags(synthetic_store):
    runner = CliRunner()
    help_text = runner.invoke(app, ["probe", "--help"]).output
    assert "--no-cache" in help_text and "--no-no-cache" not in help_text
    for cmd in ("info", "status", "verify"):
        assert runner.invoke(app, [cmd, "--store", str(synthetic_store)]).exit_code == 0, cmd
    listed = runner.invoke(app, ["datasets"]).output
    assert "subtask='paired'" in listed and "fold=0" in listed  # each dataset's --option keys and defaults


def test_piped_output_is_not_wrapped_at_80_columns(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out = invoke("models").stdout
    row = next(line for line in out.splitlines() if "tiny-llava-next-llama3" in line)
    assert "for tests" in row and len(row) > 80  # the whole row on one line


@pytest.mark.slow
def test_the_wheel_imports_and_runs_from_any_folder(tmp_path):
    """`pip install .` (a wheel, not editable) works from the repository root, which holds folders
    named like the packages, and from elsewhere; the container file's own check runs too."""
    # built from a copy: setuptools writes build/ and *.egg-info/ beside the sources it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                            "__pycache__", ".pytest_cache"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
                    "-w", str(dist), str(src)], check=True, timeout=600)
    wheel = next(dist.glob("kvpipe-*.whl"))
    venv = tmp_path / "venv"
    # no pip of its own (seconds saved): this environment's pip installs into it through --python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # the test environment's packages (torch, ray, ...) but not its editable kvpipe
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    own_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (own_site / "deps.pth").write_text(f"{site}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-cache-dir", "-q",
                    str(wheel)], check=True, timeout=600)
    dockerfile_check = "import kvpipe.pipeline.extraction.ray_executor, s3fs"
    for cwd in (ROOT, tmp_path):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run([str(py), "-c", f"{dockerfile_check}; import kvpipe; print(kvpipe.__file__)"],
                              cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert str(own_site) in done.stdout, done.stdout  # the installed package, not the checkout
        helped = subprocess.run([str(venv / "bin" / "kvpipe"), "--help"], cwd=cwd, capture_output=True, text=True,
                                env=env, timeout=300)
        assert helped.returncode == 0 and "extract" in helped.stdout, helped.stderr
