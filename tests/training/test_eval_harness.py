"""The evaluation harness's rule: every choice on validation, the test split read once, at the end."""

from __future__ import annotations

import pytest

from streaming.datasets import load_dataset
from streaming.settings import load_settings
from training import eval_harness
from training.corpus import Corpus, leave_one_out
from training.eval_harness import HarnessOptions, SealedTest, run_harness, seal

SPEC = "synthetic:n_users=120,n_items=80,n_events=3000,n_topics=6,seed=2"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("datasets")
    return Corpus.from_dataset(load_dataset(SPEC, d, progress=False), source=SPEC)


def test_a_sealed_split_has_no_test_cases_and_they_are_read_once(corpus):
    split = leave_one_out(corpus)
    fit_view, sealed = seal(split)
    assert fit_view.test is None and fit_view.valid is split.valid
    assert sealed.read() is split.test
    with pytest.raises(RuntimeError, match="already read"):
        sealed.read()


def test_every_choice_is_made_before_the_test_split_is_read_once(corpus, tmp_path, monkeypatch):
    """The order, with the cheap models (every model is fitted by the same `fit_protocol` call; the
    trained ones, the ranker and the query metrics run in tests/test_bench_quality.py)."""
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    events: list[str] = []
    real_fit, real_read = eval_harness.fit_protocol, SealedTest.read

    def fit_protocol(proto, split, **kw):
        assert split.test is None  # fitting code cannot reach the test cases
        events.append(f"fit {proto}")
        return real_fit(proto, split, **kw)

    def read(self):
        events.append("read")
        return real_read(self)

    monkeypatch.setattr(eval_harness, "fit_protocol", fit_protocol)
    monkeypatch.setattr(SealedTest, "read", read)
    report = run_harness(corpus, settings=settings, progress=False, models=("popular", "itemknn"),
                         options=HarnessOptions(epochs=1))
    assert events == ["fit test", "fit cold", "read", "read"]  # all fitting first, then one read per protocol
    res = report.results
    assert set(res) == {"popular", "itemknn"} and set(res["itemknn"]) == {"test", "cold"}
    lo, hi = report.ci["itemknn"]["test"]["ndcg10"]
    assert lo <= res["itemknn"]["test"]["ndcg10"] <= hi
    assert report.meta["choices"]["test"]["itemknn"]["chosen"]  # chosen on validation, recorded
    assert " [" in report.markdown  # intervals in the table
