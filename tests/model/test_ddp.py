"""Lightning DDP on 2 CPU processes (gloo): each rank trains on its own shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mcvi_ops

SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_ddp_two_cpu_processes(tmp_path):
    screen = mcvi_ops.datasets.synthetic_screen(
        n_cells=360,
        n_genes=6,
        n_control_guides=4,
        crop_size=32,
        seed=0,
        path=tmp_path / "crops.zarr",
    )
    screen.write_h5ad(tmp_path / "screen.h5ad")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # gradients are averaged across ranks, so both end with the same weights
    assert ranks[0]["weights_sum"] == pytest.approx(ranks[1]["weights_sum"], rel=1e-6)
    assert ranks[0]["weights_abs_sum"] == pytest.approx(ranks[1]["weights_abs_sum"], rel=1e-6)
    train_perturbed = set(ranks[0]["train_perturbed"])
    for epoch in ("0", "1"):
        seen = [ranks[r]["epochs"][epoch] for r in (0, 1)]
        assert len(seen[0]) == len(seen[1])  # same number of batches per rank
        perturbed = [{c for c, p in rows if p != 0} for rows in seen]
        controls = [{c for c, p in rows if p == 0} for rows in seen]
        assert perturbed[0].isdisjoint(perturbed[1])
        assert controls[0].isdisjoint(controls[1])
        assert perturbed[0] | perturbed[1] == train_perturbed
        assert all(controls)
