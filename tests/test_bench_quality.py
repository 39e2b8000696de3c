"""`bench/quality.py --quick`: the whole harness (tuned baselines, the two-stage model with its ranker,
intervals, the paired difference) and the natural-language intent, on small synthetic data.

The figures of a quick run are not comparable to the full MovieLens run; what is pinned here is the
JSON contract and the two query behaviours a client relies on: a query alone returns its topic,
and a query beside a history of another topic brings at least half of the list from the query's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
QUICK_TIMEOUT_S = 900


def test_quick_quality_run_keeps_its_contract_and_the_query_behaviours(tmp_path):
    out = tmp_path / "quality.json"
    env = {**os.environ, "STREAMREC_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "bench/quality.py", "--quick", "--no-progress", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = json.loads(out.read_text())
    models = {"popular", "itemknn", "sasrec", "gru4rec", "zeroshot_lm", "finetuned",
              "finetuned_first_stage", "finetuned_neural"}  # --quick leaves out sasrec_id
    assert models <= set(q["ndcg10"]) and models <= set(q["ndcg10_ci95"])
    assert "finetuned_nocal" in q["cold_recall10"]
    for name, (lo, hi) in q["ndcg10_ci95"].items():
        assert lo <= q["ndcg10"][name] <= hi, name
    paired = q["paired_ndcg10"]
    assert paired["baseline"] in models - {"finetuned", "finetuned_first_stage", "finetuned_neural"}
    assert paired["ci95"][0] <= paired["diff"] <= paired["ci95"][1]
    assert set(q["candidate_recall"]) >= {"tower", "covis", "trending", "new", "total"}
    assert q["query_only_topic_precision10"] >= 0.9, q["query_only_by_topic"]
    assert q["query_blend_topic_share10"] >= 0.5, q["query_blend_by_weight"]
    assert q["query_blend_by_weight"]["0"] < q["query_blend_by_weight"]["1"]  # the weight moves the list
    assert "PASS  query_only_precision_at_least_0.9" in proc.stdout
    assert q["targets"]["popular_matches_plain_recount"], (q["popular_recount"], q["ndcg10"]["popular"])
