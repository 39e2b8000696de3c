"""The catalog follower with a fake store and adapters (and once against a real OnlineStore)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.catalog_follower import CatalogFollower, store_item_text
from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics


class FakeStore:
    """The part of OnlineStore the follower reads; positions are "<entries>-0"."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.log: list[tuple[str, bool]] = []
        self.trimmed_before = 0  # log entries before this index are gone
        self.down = False
        self.malformed: set[str] = set()

    def publish(self, item_id: str, *, deleted: bool = False, text: str | None = None) -> None:
        self.records[item_id] = {"item_id": item_id, "title": f"Title {item_id}", "text": text, "attributes": {},
                               "ts": 0, "deleted": deleted}
        self.log.append((item_id, deleted))

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def catalog_changes(self, after: str):
        self._check()
        pos = int(after.split("-")[0])
        if pos < self.trimmed_before:
            return None
        return f"{len(self.log)}-0", self.log[pos:]

    def catalog_position(self) -> str:
        self._check()
        return f"{len(self.log)}-0"

    def live_items(self) -> set[str]:
        self._check()
        return {i for i, it in self.records.items() if not it["deleted"]}

    def deleted_items(self, item_ids) -> set[str]:
        self._check()
        return {i for i in item_ids if i in self.records and self.records[i]["deleted"]}

    def item(self, item_id: str):
        self._check()
        if item_id in self.malformed:
            raise ValueError(f"attributes of {item_id} are not JSON")
        return dict(self.records[item_id]) if item_id in self.records else None

    def items(self, item_ids):  # OnlineStore.items: one malformed record fails the whole read, as there
        return [self.item(i) for i in item_ids]


class FakeIndex:
    def __init__(self, ids) -> None:
        self.row = {i: n for n, i in enumerate(ids)}

    @property
    def size(self) -> int:
        return len(self.row)


class FakeAdapter:
    def __init__(self, ids, scene: str = "default", *, reads_text: bool = True) -> None:
        self.scene, self.model_id = scene, f"{scene}@v000001"
        self.index = FakeIndex(ids)
        self.catalog_pos: str | None = None
        self.embedded: dict[str, tuple[str, str | None]] = {}
        self.reads_text = reads_text
        self.fails_on: set[str] = set()
        self.batches: list[int] = []

    def upsert_items(self, items) -> None:
        """LoadedAdapter.upsert_items: every text is embedded before any item is added (all or none)."""
        self.batches.append(len(items))
        if not self.reads_text:
            raise AdapterLoadError(f"{self.model_id} reads no text: new items cannot be embedded")
        if any(item_id in self.fails_on for item_id, _, _ in items):
            raise RuntimeError("the model failed on this text")
        for item_id, text, title in items:
            self.embedded[item_id] = (text, title)
            self.index.row[item_id] = len(self.index.row) + 1000

    def remove_item(self, item_id: str) -> bool:
        return self.index.row.pop(item_id, None) is not None


def _follower(store, adapters: dict[str, FakeAdapter]) -> tuple[CatalogFollower, ServeMetrics]:
    metrics = ServeMetrics("r1")

    async def get_model(model_id: str):
        return adapters[model_id]

    return CatalogFollower(store, metrics, active=lambda: list(adapters), get_model=get_model, poll_s=0.001), metrics


def _errors(metrics: ServeMetrics) -> float:
    return metrics.registry.get_sample_value("streamrec_background_errors_total", {"loop": "catalog"})


def test_a_fresh_adapter_diffs_against_the_live_set_and_keeps_training_only_items():
    store = FakeStore()
    for i in ("a", "b", "new1"):
        store.publish(i)
    store.publish("c", deleted=True)
    adapter = FakeAdapter(["a", "b", "c", "trained_only"])
    f, _ = _follower(store, {})
    f.catch_up(adapter)
    assert set(adapter.index.row) == {"a", "b", "trained_only", "new1"}
    assert adapter.embedded == {"new1": ("Title new1", "Title new1")}  # no text: the title is what is read
    assert adapter.catalog_pos == store.catalog_position()


def test_then_the_change_log_is_followed_and_the_last_change_of_an_item_wins():
    store = FakeStore()
    store.publish("a")
    adapter = FakeAdapter(["a"])
    f, _ = _follower(store, {})
    f.catch_up(adapter)
    store.publish("x", text="A brand new comedy.")
    store.publish("y")
    store.publish("y", deleted=True)
    store.publish("a", deleted=True)
    f.catch_up(adapter)
    assert set(adapter.index.row) == {"x"} and adapter.embedded == {"x": ("A brand new comedy.", "Title x")}


def test_an_adapter_behind_the_trimmed_log_re_reads_the_live_set(caplog):
    store = FakeStore()
    store.publish("a")
    adapter = FakeAdapter(["a"])
    f, _ = _follower(store, {})
    f.catch_up(adapter)
    store.publish("b")
    store.publish("a", deleted=True)
    store.trimmed_before = len(store.log)
    f.catch_up(adapter)
    assert set(adapter.index.row) == {"b"} and "fell behind the catalog log" in caplog.text


def test_redis_down_leaves_the_index_and_position_and_the_next_poll_catches_up():
    store = FakeStore()
    store.publish("a")
    adapter = FakeAdapter(["a"])
    f, metrics = _follower(store, {adapter.model_id: adapter})
    asyncio.run(f.poll())
    pos = adapter.catalog_pos
    store.publish("b")
    store.down = True
    asyncio.run(f.poll())
    assert adapter.catalog_pos == pos and set(adapter.index.row) == {"a"} and _errors(metrics) == 1.0
    store.down = False
    asyncio.run(f.poll())
    assert set(adapter.index.row) == {"a", "b"}
    assert metrics.registry.get_sample_value("streamrec_index_items", {"scene": "default"}) == 2.0


def test_an_item_that_cannot_be_added_is_skipped_not_a_stall():
    store = FakeStore()
    adapter = FakeAdapter([])
    f, metrics = _follower(store, {adapter.model_id: adapter})
    asyncio.run(f.poll())
    for item in ("bad", "unembeddable", "good"):
        store.publish(item)
    store.malformed.add("bad")
    adapter.fails_on.add("unembeddable")
    asyncio.run(f.poll())
    assert set(adapter.index.row) == {"good"} and adapter.catalog_pos == store.catalog_position()
    assert _errors(metrics) == 2.0


def test_one_adapter_that_cannot_embed_does_not_stop_the_others():
    store = FakeStore()
    mute, reads = FakeAdapter([], "mute", reads_text=False), FakeAdapter([], "homepage")
    f, metrics = _follower(store, {mute.model_id: mute, reads.model_id: reads})
    store.publish("n1")
    asyncio.run(f.poll())
    assert set(reads.index.row) == {"n1"} and mute.catalog_pos is None and _errors(metrics) == 1.0


def test_run_keeps_following():
    store = FakeStore()
    adapter = FakeAdapter([])
    f, _ = _follower(store, {adapter.model_id: adapter})

    async def scenario():
        task = asyncio.create_task(f.run())
        store.publish("n1")
        while "n1" not in adapter.index.row:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_the_item_text_is_trainings_recipe():
    item = {"item_id": "m1", "title": "Heat", "text": None, "attributes": {"genres": ["Crime"]}}
    assert store_item_text({**item, "text": "Own text."}) == "Own text."
    assert store_item_text(item).startswith("Heat") and "Crime" in store_item_text(item)


@pytest.mark.integration
def test_against_a_real_online_store(embedded_stack):
    """The OnlineStore methods the follower reads (live_items, deleted_items, the change log)."""
    import redis

    from streaming.events import Item
    from streaming.online_store import OnlineStore

    store = OnlineStore(redis.Redis.from_url(embedded_stack.redis_url), f"t{uuid.uuid4().hex[:8]}:")
    ts = 1_700_000_000_000
    store.apply_items("items", 0, [(0, Item(item_id="a", title="A", ts=ts)), (1, Item(item_id="b", title="B", ts=ts)),
                                   (2, Item(item_id="c", title="C", ts=ts, deleted=True))])
    assert store.live_items() == {"a", "b"}
    assert store.deleted_items(["a", "c", "never_published"]) == {"c"} and store.deleted_items([]) == set()
    adapter = FakeAdapter(["a", "c", "trained_only"])
    f, _ = _follower(store, {})
    f.catch_up(adapter)
    assert set(adapter.index.row) == {"a", "b", "trained_only"}
    store.apply_items("items", 0, [(3, Item(item_id="d", title="D", text="Dramatic.", ts=ts)),
                                   (4, Item(item_id="a", title="A", ts=ts, deleted=True))])
    f.catch_up(adapter)
    assert set(adapter.index.row) == {"b", "d", "trained_only"} and adapter.embedded["d"] == ("Dramatic.", "D")


def test_many_new_items_go_in_batches():
    """2,500 new items: three store reads and three adapter batches (UPSERT_BATCH), not 2,500."""
    from services.catalog_follower import UPSERT_BATCH

    store = FakeStore()
    for k in range(2_500):
        store.publish(f"n{k:04d}", text=f"text {k}")
    adapter = FakeAdapter([])
    follower, _ = _follower(store, {adapter.model_id: adapter})
    asyncio.run(follower.poll())
    assert adapter.batches == [UPSERT_BATCH, UPSERT_BATCH, 2_500 - 2 * UPSERT_BATCH]
    assert len(adapter.embedded) == 2_500
