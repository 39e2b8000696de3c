"""training/embed.py: a small CPU catalog is embedded in the calling process, a larger one (or any with a GPU) by
the Ray Data actor pool -- the same vectors either way, and the same as the published item table."""

from __future__ import annotations

import numpy as np
import pytest

from training.adapter import ADAPTER_FILE, EMBEDDINGS_FILE, read_embeddings
from training.embed import IN_PROCESS_MAX_ITEMS, embed_catalog
from training.registry import Registry
from tests.fixtures.synthetic_adapter import publish_synthetic_adapter, synthetic_catalog

ITEMS = 40


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    registry = Registry(str(tmp / "registry"))
    warm = np.arange(ITEMS) % 3 != 0  # cold items too: their vector is the text alone
    publish_synthetic_adapter(registry, tmp / "staging", n_items=ITEMS, seed=3, warm=warm)
    ids, _, texts = synthetic_catalog(ITEMS)
    return registry.open("default"), ids, texts, warm


def test_a_small_catalog_is_embedded_in_process_as_published(published, monkeypatch):
    directory, ids, texts, warm = published
    import ray

    def no_ray(*a, **kw):
        raise AssertionError("a small CPU catalog must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    assert ITEMS <= IN_PROCESS_MAX_ITEMS
    emb = embed_catalog(directory / ADAPTER_FILE, ids, texts, warm, batch_rows=16)  # three batches, one short
    _, _, table = read_embeddings(directory / EMBEDDINGS_FILE)
    assert emb.shape == table.shape and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, table, atol=1e-4)


@pytest.mark.integration
def test_the_actor_pool_gives_the_same_vectors(published, ray_local):
    directory, ids, texts, warm = published
    in_process = embed_catalog(directory / ADAPTER_FILE, ids, texts, warm)
    pooled = embed_catalog(directory / ADAPTER_FILE, ids, texts, warm, actors=1, in_process_max_items=0)
    np.testing.assert_allclose(pooled, in_process, atol=1e-5)
