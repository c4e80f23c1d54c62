"""The sweep benchmark's Ray comparison on the session's shared Ray instance: local against Ray
with one actor SIGKILLed at once; the rows are identical and nothing finished is recomputed."""

from __future__ import annotations

import pytest

from fixtures.sweep_args import TINY


@pytest.mark.slow
def test_ray_against_local_with_one_actor_killed(tmp_path, ray_cluster):
    from kvpipe.benchmarks import sweep

    res = sweep.main(["--probe", "cosegmentation", "--out", str(tmp_path / "s"), *TINY, "--layers", "3",
                      "--executor", "local,ray", "--kill-one-after", "0"])
    (check,) = res["ray_checks"]
    assert check["identical_rows"] and check["recomputed"] == 0 and check["killed_pids"]
    assert res["ray_speedup"] > 0
