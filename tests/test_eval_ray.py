"""`--ray`: the same run sharded over actors of a local Ray instance gives the same lines."""

from __future__ import annotations

import pytest
from test_eval import home_with_probe, small_config, tiny_dir  # noqa: F401  (fixtures)

from rootdefense.evaluation import run_eval
from rootdefense.jsonl import read_objects

ray = pytest.importorskip("ray")


def test_ray_sharded_run_matches_local_run(tiny_dir, home_with_probe, tmp_path):  # noqa: F811
    cfg = small_config(tiny_dir, attacks=["none", "prefill"], defenses=["none", "self-reminder"])
    local = run_eval(cfg, tmp_path / "local", progress=False)
    sharded = run_eval(cfg, tmp_path / "ray", ray_address="local", workers=2, progress=False)
    assert sharded["run"]["results"] == local["run"]["results"]

    def answers(folder):
        return {o["key"]: o["answer"] for o in read_objects(folder / "results.jsonl") if o["kind"] == "result"}

    assert answers(tmp_path / "ray") == answers(tmp_path / "local")
    session = [o for o in read_objects(tmp_path / "ray" / "results.jsonl") if o["kind"] == "session"][-1]
    assert session["ray"] == "local" and session["workers"] == 2
