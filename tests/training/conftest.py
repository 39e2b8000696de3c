"""Fixtures of tests/training/: a small synthetic corpus with strong successor structure (for the
sequential baselines, training/sasrec.py and training/gru4rec.py), split two ways."""

from __future__ import annotations

import pytest

from streaming.datasets import load_dataset
from training.corpus import Corpus, Split, cold_start_split, leave_one_out

# p_follow 0.9: most next items are a planted successor of the previous one -- a sequence model
# must find that, popularity cannot.
SEQ_SPEC = "synthetic:n_users=160,n_items=50,n_events=4000,n_topics=4,seed=5,p_follow=0.9"


@pytest.fixture(scope="session")
def seq_corpus(tmp_path_factory) -> Corpus:
    return Corpus.from_dataset(load_dataset(SEQ_SPEC, tmp_path_factory.mktemp("seq")))


@pytest.fixture(scope="session")
def seq_split(seq_corpus) -> Split:
    return leave_one_out(seq_corpus)


@pytest.fixture(scope="session")
def seq_cold_split(seq_corpus) -> Split:
    return cold_start_split(seq_corpus, cold_share=0.2, seed=0)
