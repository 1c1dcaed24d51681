"""Lightning DDP on 2 CPU processes (gloo): each rank trains on its own shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_script, tiny_screen_on_disk

SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_ddp_two_cpu_processes(tmp_path):
    tiny_screen_on_disk(tmp_path)
    run_script(SCRIPT, tmp_path, tmp_path, cwd=tmp_path, timeout=600)
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
