"""Every benchmark script of kvpipe.benchmarks, run in this process on the CPU with tiny models
and the smallest sizes: its ``main(argv)`` parses named flags, runs, and returns (and writes
with ``--json``) results that make sense. The figures themselves need the full-size models
and a GPU (docs/BENCHMARKS.md)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

SCRIPTS = ("capture_stages", "cli_latency", "codecs", "disk_rewrite", "encoded_reads", "encoder_interference",
           "encoder_pool", "encoding_sizes",
           "extract_timeline", "host_buffers", "int4_slices",
           "kv_structure", "linear_probes", "lossy_fidelity", "multi_gpu", "prefill_kernels", "read_checks", "sweep")
# a tiny MLM on the CPU: 4 images of 56 x 56 (4 image tokens each), batches of 2
TINY = ["--device", "cpu", "--model", "tiny-qwen25vl", "--dtype", "float32", "--image-size", "56",
        "--images", "4", "--batch-size", "2"]


def script(name: str):
    return importlib.import_module(f"kvpipe.benchmarks.{name}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help_with_the_shared_flags(name, capsys):
    with pytest.raises(SystemExit) as stop:
        script(name).main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "--json" in text and "shared benchmark flags" in text


def test_capture_stages_times_every_stage(tmp_path):
    from kvpipe.store import chunks

    threads, switch = chunks.THREADS, sys.getswitchinterval()
    res = script("capture_stages").main(TINY + ["--threads", "1", "--switch", "0.001", "--dir", str(tmp_path),
                                                "--store-dtype", "int4", "--codec", "lz4bit", "--sample"])
    rates = res["images_per_s"]
    assert list(rates)[:6] == ["prefill", "prefill+gather bfloat16", "prefill+gather int8", "prefill+gather int4",
                               "prefill+gather+copy (pool cold)", "prefill+gather+copy (pool warm)"]
    assert "prefill+gather+copy+write (1 encoders, GIL switch 1 ms)" in rates
    assert all(v > 0 for v in rates.values())
    assert list(tmp_path.iterdir()) == []  # its parts are removed
    assert (chunks.THREADS, sys.getswitchinterval()) == (threads, switch)  # the process is left as it was


def test_codecs_encode_real_kv_with_every_codec(tmp_path):
    out = tmp_path / "codecs.json"
    res = script("codecs").main(TINY + ["--threads", "2", "--json", str(out)])
    assert [(r["dtype"], r["codec"]) for r in res["codecs"]][-2:] == [("int8", "zstd"), ("int8", "lz4")]
    assert len(res["codecs"]) == 8
    for row in res["codecs"]:
        assert 0 < row["stored_per_raw"] < 1.2 and row["encode_mb_s_1"] > 0 and row["encode_mb_s_2"] > 0
        assert row["decode_mb_s_1"] > 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))


def test_disk_rewrite_writes_and_removes_each_round(tmp_path):
    res = script("disk_rewrite").main(["--dir", str(tmp_path), "--rounds", "2", "--round-mib", "2",
                                       "--block-mib", "1"])
    assert len(res["mb_s"]) == 2 and all(r > 0 for r in res["mb_s"]) and res["bytes_per_round"] == 2 << 20
    assert list(tmp_path.iterdir()) == []


def test_encoder_interference_times_the_capture_beside_encoder_threads_and_processes():
    res = script("encoder_interference").main(TINY + ["--codecs", "lz4", "--workers", "1", "--switch", "0.001",
                                                      "--settle", "0.05"])
    rates = res["images_per_s"]
    assert set(rates) == {"capture alone", "+ 1 encoder threads lz4, GIL switch 5 ms",
                          "+ 1 encoder threads lz4, GIL switch 1 ms", "+ 1 encoder processes lz4"}
    assert all(v > 0 for v in rates.values())


def test_extract_timeline_runs_each_variant_and_restores_the_upload(tmp_path):
    from kvpipe.pipeline.extraction import ExtractResult, worker

    uploads, timed = worker.on_device_ahead, ExtractResult.timed
    res = script("extract_timeline").main(TINY + ["--part-size", "2", "--variants", "noupload,upload",
                                                  "--load-threads", "1", "--out", str(tmp_path)])
    assert set(res) == {"prefill", "prefill, 1 zstd encoder threads busy", "warm-up (upload)",
                        "extraction 1 (noupload)", "extraction 2 (upload)"}
    assert res["extraction 1 (noupload)"]["steady_images_per_s"] > 0
    assert "capture" in res["extraction 2 (upload)"]["seconds_in_steady_window"]
    assert (worker.on_device_ahead, ExtractResult.timed) == (uploads, timed)
    with pytest.raises(SystemExit, match="unknown fast"):
        script("extract_timeline").main(TINY + ["--variants", "fast"])


def test_host_buffers_refuses_without_cuda_in_one_line():
    import torch

    with pytest.raises(SystemExit) as stop:
        script("host_buffers").main(["--device", "cpu"])
    message = str(stop.value.code)
    assert "needs a CUDA device" in message and "\n" not in message
    if not torch.cuda.is_available():
        pytest.skip("host_buffers measures CUDA host memory: no GPU here")
    res = script("host_buffers").main(["--device", "cuda", "--mib", "64"])
    assert all(v > 0 for v in res["gb_s"].values())


def test_linear_probes_fits_episodes_in_batches():
    res = script("linear_probes").main(["--devices", "cpu", "--episodes", "6", "--tokens", "16", "--dim", "8",
                                        "--repeat", "1"])
    cpu = res["devices"]["cpu"]
    assert cpu["episodes"] == 6 and cpu["episodes_per_s"] > 0 and cpu["newton_steps"] >= 1
    assert res["per_batch"] >= 1
    # the solver's two Newton systems on the same episodes, where the support tokens (2 x 3) are
    # fewer than the features: the same coefficients
    res = script("linear_probes").main(["--devices", "cpu", "--episodes", "4", "--tokens", "3", "--dim", "40",
                                        "--shots", "2", "--repeat", "1", "--spaces", "features,tokens"])
    tokens = res["devices"]["cpu tokens"]
    assert set(res["devices"]) == {"cpu features", "cpu tokens"} and tokens["speed_vs_cpu features"] > 0
    assert tokens["relative_coef_diff"] < 1e-4


def test_int4_slices_times_both_slicings_and_restores_the_budget():
    from kvpipe.pipeline.models import capture

    budget = capture.int4_slice_rows
    res = script("int4_slices").main(["--device", "cpu", "--tokens", "64", "--layers", "3", "--hidden", "256",
                                      "--repeats", "1"])
    assert set(res["results"]) == {"keys/values", "post_proj"}
    assert res["results"]["post_proj"]["rows per slice"] == 64 and res["results"]["keys/values"]["speedup"] > 0
    assert capture.int4_slice_rows is budget


def test_lloyd_max_candidates_are_the_gaussian_optimum():
    """On Gaussian coordinates the 16-level Lloyd-Max code has MSE 0.009497 per unit variance
    (Max 1960): RMS relative error 0.0975; kvpipe's min-max int4 is within a few percent of it.
    The 8-level (3-bit) code: 0.03454, 3.6 x int4's squared error."""
    import numpy as np

    lf = script("lossy_fidelity")
    x = np.random.default_rng(0).standard_normal((4000, 128)).astype(np.float32)
    rel = {name: np.sqrt(np.mean(np.sum((x - f(x)) ** 2, 1) / np.sum(x ** 2, 1)))
           for name, (_, f) in lf.candidates().items()}
    assert rel["4-bit Lloyd-Max (hadamard, RMS scale)"] == pytest.approx(np.sqrt(0.009497), rel=0.02)
    assert rel["4-bit Lloyd-Max (hadamard, RMS scale)"] < rel["int4 (hadamard)"] < 1.05 * np.sqrt(0.009497)
    assert rel["3-bit Lloyd-Max (hadamard, RMS scale)"] == pytest.approx(np.sqrt(0.03454), rel=0.02)
    assert (rel["3-bit Lloyd-Max (hadamard, RMS scale)"] / rel["int4 (hadamard)"]) ** 2 > 3.3


def test_lossy_fidelity_compares_int8_and_int4_with_the_lossless_store(tmp_path, monkeypatch):
    from kvpipe.errors import UsageError

    lf = script("lossy_fidelity")
    real_run, real_extract = lf.run_probe, lf.extract

    def run_probe(store, task, *a, **kw):  # a task the store cannot serve (as fg-seg with too few supports)
        if task == "fg-seg":
            raise UsageError("--param shots=5 is more than the 3 support images per episode")
        return real_run(store, task, *a, **kw)

    monkeypatch.setattr(lf, "run_probe", run_probe)
    res = lf.main(["--out", str(tmp_path / "lossy"), "--option", "n_frames=2",  # 4 videos x 2 frames
                   "--tasks", "input-agnostic,cosegmentation,fg-seg"])
    assert res["images"] == 8 and set(res["tasks"]) == {"input-agnostic", "cosegmentation"}
    for rows in res["tasks"].values():  # the lossy choice's cost on the lossless store
        for row in rows.values():
            assert row["best_target_regret"] >= 0 and (row["best_target_regret"] == 0) >= row["same_best_target"]
            assert row["best_target_gap_reference"] >= 0  # the lossless store's lead of its best target
    # the task that cannot run is reported as skipped, the others still count
    assert set(res["skipped"]) == {"fg-seg"} and "shots" in res["skipped"]["fg-seg"]
    # k-means is seeded: its spread between two seeds on the lossless store is reported beside the encodings
    assert set(res["tasks"]["cosegmentation"]) == {"int8", "int4", "seed+1"}
    assert "seed+1" not in res["tasks"]["input-agnostic"]
    for enc in ("int8", "int4"):
        row = res["tasks"]["input-agnostic"][enc]
        assert row["targets"] > 0 and row["max_abs_diff"] >= row["mean_abs_diff"] >= 0
        assert res["bytes_per_image"][enc] < res["bytes_per_image"]["reference"]
    assert res["bytes_per_image"]["int4"] < res["bytes_per_image"]["int8"]
    assert res["features"]["int8"]["min_cosine"] > 0.999 and res["features"]["int8"]["max_rel_error"] < 0.01
    assert 0.9 < res["features"]["int4"]["mean_cosine"] < res["features"]["int8"]["mean_cosine"]
    cand = res["candidates"]
    assert set(cand) == {"int8", "fp8-e4m3", "int4 (hadamard)", "int4 (no rotation)",
                         "4-bit Lloyd-Max (hadamard, RMS scale)", "3-bit Lloyd-Max (hadamard, RMS scale)"}
    # the stored int4 is the rotated candidate: the same mean cosine as computed on the host
    assert cand["int4 (hadamard)"]["mean_cosine"] == pytest.approx(res["features"]["int4"]["mean_cosine"], abs=1e-6)
    with pytest.raises(SystemExit, match="needs --out"):
        script("lossy_fidelity").main([])
    # --resume keeps the complete stores of the run above (a killed run's probes redo without
    # extracting, and without holding the model) and extracts only what is missing
    import shutil

    shutil.rmtree(tmp_path / "lossy" / "int8")
    extracted = []
    monkeypatch.setattr(lf, "extract", lambda cfg: (extracted.append(cfg.store_dtype), real_extract(cfg)))
    again = lf.main(["--out", str(tmp_path / "lossy"), "--option", "n_frames=2", "--tasks", "input-agnostic",
                     "--resume"])
    assert extracted == ["int8"]
    assert again["tasks"]["input-agnostic"]["int4"] == res["tasks"]["input-agnostic"]["int4"]


def test_lossy_fidelity_recodes_the_lossless_store_for_pca_at_a_step(tmp_path, monkeypatch):
    """--recode: one extraction (the lossless store), each lossy store recoded from it; pca@STEP
    is pca with that step, its squared error within a uniform quantiser's step^2 / 12."""
    lf = script("lossy_fidelity")
    real_extract = lf.extract
    extracted = []
    monkeypatch.setattr(lf, "extract", lambda cfg: (extracted.append(cfg.store_dtype), real_extract(cfg)))
    res = lf.main(["--out", str(tmp_path / "lossy"), "--option", "n_frames=2", "--tasks", "input-agnostic",
                   "--encodings", "int4,pca@0.3", "--recode"])
    assert extracted == ["float32"]
    assert set(res["tasks"]["input-agnostic"]) == {"int4", "pca@0.3"}
    assert 0.3 * 0.3 ** 2 / 12 < res["features"]["pca@0.3"]["rel_sq_error"] < 1.05 * 0.3 ** 2 / 12
    from kvpipe.store import FeatureStore

    assert FeatureStore.open(tmp_path / "lossy" / "pca@0.3").meta.compressor.step == 0.3


def test_encoding_sizes_recodes_each_encoding_and_compares_it(synthetic_store, tmp_path):
    out = script("encoding_sizes").main([str(synthetic_store), "--encodings", "int8,int4,pca@0.6",
                                         "--out", str(tmp_path / "sizes"), "--json", str(tmp_path / "s.json")])
    rows = out["encodings"]
    assert set(rows) == {"int8", "int4", "pca@0.6"}
    assert rows["int8"]["rel_sq_error"] < rows["int4"]["rel_sq_error"] < rows["pca@0.6"]["rel_sq_error"] < 0.6 ** 2 / 12
    for row in rows.values():  # every lossy encoding is smaller than the lossless store, as counted
        assert row["ratio"] > 1 and row["kv_bytes_per_image"] * row["ratio"] == pytest.approx(
            out["lossless"]["kv_bytes_per_image"])
        assert row["rel_sq_error_min"] <= row["rel_sq_error"] <= row["rel_sq_error_max"]
        assert row["host_s_per_chunk"] > 0
    assert out["lossless"]["host_s_per_chunk"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["images"] == out["images"]
    assert not (tmp_path / "sizes" / "int4").exists()  # each recoded store is removed after its figures


def test_encoder_pool_times_each_encoding_and_pca_with_blas_free(synthetic_store, tmp_path):
    from kvpipe.store import chunks

    threads = chunks.THREADS
    try:
        out = script("encoder_pool").main([str(synthetic_store), "--rounds", "2", "--threads", "2",
                                           "--out", str(tmp_path / "pool"), "--json", str(tmp_path / "p.json")])
    finally:
        chunks.set_threads(threads)
    assert list(out["rows"]) == ["lossless", "int8", "int4", "pca", "pca, BLAS free"]
    assert out["threads"] == 2 and out["images"] > 0
    for row in out["rows"].values():
        assert row["images_per_s"] == pytest.approx(out["images"] / row["seconds"])
    assert not (tmp_path / "pool").exists()  # the chunk files are removed after the timings
    assert json.loads((tmp_path / "p.json").read_text())["rows"].keys() == out["rows"].keys()


def test_multi_gpu_compares_the_stores_of_both_runs(tmp_path):
    # the local executor in place of Ray keeps this short; tests/test_ray_executor.py runs Ray
    res = script("multi_gpu").main(TINY + ["--images", "8", "--part-size", "4", "--gpus", "1", "--no-kill",
                                           "--executor", "local", "--out", str(tmp_path / "mgpu")])
    assert res["single"]["images"] == res["ray"]["images"] == 8 and res["single"]["parts"] == 2
    same = res["ray_vs_single"]
    assert same["rows_equal"] and same["parts_identical"] == same["parts"] == 2 and same["max_abs_diff"] == 0
    assert res["gpu"] == "cpu" and res["dtype"] == "float32"


def test_prefill_kernels_times_stock_and_accelerated_prefill():
    res = script("prefill_kernels").main(TINY[:-4] + ["--images", "2", "--batch-size", "2"])
    rates = res["images_per_s"]
    assert {"transformers (stock)", "accelerated (again)"} <= set(rates)
    assert all(v > 0 for v in rates.values()) and res["accelerated_over_stock"] > 0


def test_sweep_builds_a_store_and_times_a_probe_sweep(tmp_path):
    out = tmp_path / "sweep.json"
    res = script("sweep").main(["--out", str(tmp_path / "store"), "--images", "6", "--grid", "4", "--layers", "2",
                                "--heads", "1", "--head-dim", "8", "--hidden", "16", "--pairs", "5",
                                "--part-size", "4", "--repeat", "1", "--search", "torch", "--device", "cpu",
                                "--store-dtype", "int4", "--host-decode", "--json", str(out)])
    assert res["targets"] == 2 * 2 * 1 + 1  # keys and values of 2 layers x 1 head, and post-proj
    assert res["sweeps"]["host-decode"][0]["total_s"] > 0  # the same sweep, decoded on the host
    assert res["disk_bytes"] > 0 and res["read_s"][0] > 0
    assert res["sweeps"]["torch"][0]["total_s"] >= res["sweeps"]["torch"][0]["read_s"] > 0
    assert json.loads(out.read_text())["targets"] == 5


def test_sweep_times_each_target_and_profiles_the_second(tmp_path):
    res = script("sweep").main(["--probe", "temporal-corr", "--out", str(tmp_path / "store"), "--videos", "2",
                                "--images", "6", "--grid", "4", "--layers", "1", "--heads", "1", "--head-dim", "8",
                                "--hidden", "16", "--mask-size", "64x40", "--part-size", "3", "--repeat", "1",
                                "--no-raw-read", "--device", "cpu", "--profile"])
    sweep = res["sweeps"]["device"][0]
    assert len(sweep["per_target_compute_s"]) == res["targets"] == 3
    assert sum(sweep["per_target_compute_s"]) == pytest.approx(sweep["compute_s"], rel=0.05)
    assert "aten::bmm" in sweep["profile"]  # the propagation's affinities, on the profiled target
    each = sweep["per_target_compute_s"]  # 225 targets: the first, 224 more like the median, reads, the rest
    assert sweep["projected_s"] == pytest.approx(each[0] + 224 * np.median(each[1:])
                                                 + 75 * sweep["read_wait_s"] + sweep["rest_s"])


def test_cli_latency_times_each_command_per_executable(synthetic_store, tmp_path):
    out = tmp_path / "cli.json"
    res = script("cli_latency").main(["--store", str(synthetic_store), "--repeat", "1", "--only",
                                      "--help,info,extract: misspelt --model", "--json", str(out)])
    (exe,) = res["executables"]
    assert set(res["median_s"]) == {"--help", "info", "extract: misspelt --model"}
    assert all(res["median_s"][name][exe] > 0 for name in res["median_s"])
    assert res["exit_codes"]["info"][exe] == 0 and res["exit_codes"]["extract: misspelt --model"][exe] == 2
    assert json.loads(out.read_text())["repeat"] == 1


def test_read_checks_times_checked_and_unchecked_reads(tmp_path):
    out = tmp_path / "rc.json"
    res = script("read_checks").main(["--parts", "2", "--tokens", "64", "--layers", "2", "--heads", "2",
                                      "--repeats", "1", "--json", str(out)])
    assert set(res["median_s"]) == {"checked", "unchecked"} and res["decoded_bytes"] > 0
    assert res["one_thread_s"]["crc32c"] > 0 and json.loads(out.read_text())["args"]["parts"] == 2


def test_encoded_reads_times_each_encoding_against_the_raw_lossless_read(tmp_path):
    out = tmp_path / "er.json"
    res = script("encoded_reads").main(["--out", str(tmp_path / "stores"), "--images", "6", "--grid", "4",
                                        "--heads", "1", "--head-dim", "16", "--part-size", "3",
                                        "--encodings", "int4,int8", "--repeats", "1", "--no-cold", "--device", "cpu",
                                        "--json", str(out)])
    assert set(res["reads"]) == {"warm"}
    warm = res["reads"]["warm"]
    assert set(warm) == {"raw bfloat16", "raw int8", "raw int4", "bfloat16", "int8", "int4", "int4 (stored basis)",
                         "bfloat16 to cpu", "int8 to cpu", "int4 to cpu"}
    assert warm["raw int4"]["stored_bytes"] == warm["int4"]["stored_bytes"]  # each encoding's own files
    assert warm["int4 (stored basis)"]["stored_bytes"] == warm["int4"]["stored_bytes"]
    assert warm["int4 to cpu"]["stored_bytes"] == warm["int4"]["stored_bytes"] and warm["int4 to cpu"]["seconds"] > 0
    assert warm["raw bfloat16"]["ratio_to_raw_lossless"] == 1.0 and warm["int4"]["images_per_s"] > 0
    assert warm["int4"]["stored_bytes"] < warm["int8"]["stored_bytes"] < warm["bfloat16"]["stored_bytes"]
    assert json.loads(out.read_text())["args"]["encodings"] == "int4,int8"


def test_kv_structure_rates_match_the_textbook_cases():
    """Entropy of known histograms; the Gaussian rate-distortion bound of an isotropic source is
    0.5 log2(variance / error); on isotropic Gaussian vectors int4 costs its codes' 3.63 bits plus
    0.5 for its scale and zero point, and no coder gains from a principal basis or a mean there;
    a shared mean and unequal channels are what the KLT coder turns into fewer bits, also with
    its basis fitted on other vectors and its codes under zstd."""
    ks = script("kv_structure")
    assert ks.entropy_bits(np.array([0, 1, 2, 3] * 5)) == pytest.approx(2.0)
    cols = np.stack([np.array([0, 1] * 8), np.array([5] * 16)], axis=1)  # 1 bit and 0 bits
    assert ks.entropy_bits(cols, axis=1) == pytest.approx(0.5)
    assert ks.gaussian_rd(np.full(128, 4.0), 128 * 4.0 / 1024) == pytest.approx(5.0, abs=1e-6)
    # unequal variances: water-filling drops the channel below the water level
    assert ks.gaussian_rd(np.array([16.0, 1e-6]), 2 * 1.0) < 0.5 * np.log2(16.0 / 1.0)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 128)).astype(np.float32)
    iso = ks.analyse(x, part_tokens=2048)
    assert iso["int4_bits"] == pytest.approx(3.63 + 0.5, abs=0.03)
    assert iso["gaussian_rd_bits"] == pytest.approx(0.5 * np.log2(1 / iso["int4_rel_mse"]), abs=0.02)
    assert iso["gaussian_rd_bits"] < iso["klt_ecsq_bits"] < iso["rotated_ecsq_bits"] < iso["int4_bits"]
    assert iso["klt_gain_bits"] < 0.03 and iso["mean_share"] < 0.01
    # the same total error, spread over tokens: int4's per-token range against one step for all
    assert 0.1 < iso["int4_token_error_p99"] < 0.14 and 0.1 < iso["klt_held_out_token_error_p99"] < 0.14

    mixing = rng.standard_normal((128, 128)) * np.exp(-np.arange(128) / 16)[None, :]
    skewed = ks.analyse((x @ mixing.T + 2).astype(np.float32), part_tokens=2048)
    assert skewed["mean_share"] > 0.3 and skewed["klt_gain_bits"] > 1.5
    assert skewed["klt_ecsq_bits"] < iso["klt_ecsq_bits"] - 1.5
    # a basis fitted on other vectors of the same source costs little; zstd comes near the entropy
    for r in (iso, skewed):
        assert r["klt_ecsq_bits"] <= r["klt_held_out_bits"] < r["klt_ecsq_bits"] + 0.15
        assert r["klt_held_out_bits"] - 0.05 < r["klt_held_out_zstd_bits"] < r["klt_held_out_bits"] + 0.5
        # a basis per part of 2,048 tokens: its float16 mean and the kept components' vectors
        # cost (128 + 128 x kept) x 16 bits per part, up to 1 bit per value
        side = (r["klt_per_part_bits"] - r["klt_ecsq_bits"])
        assert 0.2 < side < 1.1


def test_kv_structure_fits_the_held_out_basis_on_the_first_half_only():
    """Images whose second half sits elsewhere (another mean, other principal directions): a basis
    fitted on the first half codes the second worse than one fitted on the second itself."""
    ks = script("kv_structure")
    rng = np.random.default_rng(1)
    scales = np.exp(-np.arange(128) / 16)
    first = rng.standard_normal((2048, 128)) * scales
    turn = np.linalg.qr(rng.standard_normal((128, 128)))[0]
    second = (rng.standard_normal((2048, 128)) * scales) @ turn + 1.0
    r = ks.analyse(np.concatenate([first, second]).astype(np.float32))
    own = ks.klt_ecsq(second.astype(np.float32), ks.int4_point(second.astype(np.float32))[0])[0]
    assert r["klt_held_out_bits"] > own + 1.0


def test_kv_structure_reads_every_target_of_a_store(synthetic_store, tmp_path):
    from kvpipe.store import FeatureStore

    out = script("kv_structure").main([str(synthetic_store), "--tokens", "64", "--json", str(tmp_path / "s.json")])
    meta = FeatureStore.open(synthetic_store).meta
    assert len(out["targets"]) == 2 * len(meta.layers) * len(meta.heads)
    assert json.loads((tmp_path / "s.json").read_text())["median"]["lossless_bits"] > 0
