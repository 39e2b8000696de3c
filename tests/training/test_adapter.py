"""The adapter contract (training/adapter.py) cannot drift: the checkpoint dict has exactly the
documented keys, the manifest payload exactly the documented fields, a saved adapter loads back
into a model that scores the same, and no other module defines the adapter's file names or
calls `torch.load`."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from training.adapter import (
    ADAPTER_FILE,
    CATALOG_KEYS,
    CHECKPOINT_KEYS,
    COVIS_KEY,
    DATA_WINDOW_FIELDS,
    EMBEDDINGS_FILE,
    MANIFEST_FIELDS,
    checkpoint_dict,
    data_window,
    load_adapter,
    load_adapter_model,
    load_torch_file,
    manifest_payload,
    new_event_masks,
    pack_strings,
    read_embeddings,
    save_adapter,
    set_covis_prior,
    unpack_strings,
    with_catalog,
    write_embeddings,
)
from training.corpus import Catalog, Corpus
from training.covis import CovisPrior
from training.lm import resolve_base_model
from training.model import ModelConfig
from training.train_step import TrainConfig, build_model

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("streaming", "training", "services", "tests", "bench")
# Where the file names must come from the contract: the code and the builders. (A test may still
# spell a name in an expected message; it cannot make anything write or read another file.)
NAME_DIRS = ("streaming", "training", "services", "bench", "tests/fixtures")
CONTRACT = ROOT / "training" / "adapter.py"
N_ITEMS = 10
IDS = [f"i{i}" for i in range(N_ITEMS)]
TITLES = [f"Item {i}" for i in range(N_ITEMS)]
TEXTS = [f"item {i} about {'space rockets' if i % 2 else 'garden flowers'}" for i in range(N_ITEMS)]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(base_model=resolve_base_model(None), dim=16, max_len=6, heads=2, blocks=1, lora_layers=1)
    m = build_model(cfg, TEXTS, np.ones(N_ITEMS, dtype=bool), seed=1)
    with torch.no_grad():  # away from the initialization, so a round trip that drops weights shows
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def published(model) -> dict:
    prior = CovisPrior.fit([np.array([0, 1, 2, 1, 3], dtype=np.int32)], N_ITEMS, beta=0.2)
    adapter = with_catalog(checkpoint_dict(model, IDS, np.ones(N_ITEMS, dtype=bool)), TEXTS, TITLES)
    set_covis_prior(adapter, prior)
    return adapter


def test_checkpoint_dict_has_exactly_the_documented_keys(model, tmp_path):
    ckpt = checkpoint_dict(model, IDS, np.ones(N_ITEMS, dtype=bool))
    assert set(ckpt) == CHECKPOINT_KEYS and ckpt["extra"] == {}
    saved = load_adapter(save_adapter(published(model), tmp_path / ADAPTER_FILE))
    assert set(saved) == CHECKPOINT_KEYS | {COVIS_KEY}
    assert set(saved["extra"]) == CATALOG_KEYS
    assert saved["item_ids"] == IDS and saved["extra"]["item_titles"] == TITLES
    assert load_adapter(tmp_path)["item_ids"] == IDS  # a version directory: its ADAPTER_FILE

    no_ids = checkpoint_dict(model, [f"x{i}" for i in range(3 * N_ITEMS)], np.ones(3 * N_ITEMS, dtype=bool),
                             id_embeddings=False)
    assert set(no_ids) == CHECKPOINT_KEYS and not any(k.startswith("id_emb") for k in no_ids["heads"])
    with pytest.raises(ValueError, match="30 item ids"):
        checkpoint_dict(model, no_ids["item_ids"], no_ids["warm"])
    with pytest.raises(ValueError, match="unknown keys"):
        save_adapter({**ckpt, "surprise": 1}, tmp_path / "bad.pt")


def test_a_file_that_is_not_an_adapter_is_refused_without_running_code(tmp_path):
    torch.save({"format": 1}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing keys"):
        load_adapter(tmp_path / "partial.pt")
    torch.save({"payload": Path("x")}, tmp_path / "code.pt")  # an arbitrary class: weights_only refuses it
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_adapter(tmp_path / "code.pt")


def test_save_load_round_trip_gives_the_same_model_outputs(model, tmp_path):
    path = save_adapter(published(model), tmp_path / ADAPTER_FILE)
    again = load_adapter_model(load_adapter(path))
    model.refresh_text_cache(), again.refresh_text_cache()
    with torch.no_grad():
        table, table2 = model.item_table(), again.item_table()
        assert torch.allclose(table, table2, atol=1e-5)
        inputs = torch.tensor([[0, 0, 1, 2, 3, 4]])
        gaps = torch.ones_like(inputs)
        assert torch.allclose(model.user_embedding(inputs, gaps, table), again.user_embedding(inputs, gaps, table2),
                              atol=1e-5)
        assert torch.allclose(model.text_vectors(["a new garden item"]), again.text_vectors(["a new garden item"]),
                              atol=1e-5)
    serving = load_adapter_model(load_adapter(path), catalog=False)  # no catalog: vectors come from the file
    assert serving.text_cache is None and serving.n_items == N_ITEMS

    emb = table[1:].numpy()
    write_embeddings(tmp_path / EMBEDDINGS_FILE, IDS, np.ones(N_ITEMS, dtype=bool), emb)
    ids, warm, back = read_embeddings(tmp_path / EMBEDDINGS_FILE)
    assert ids == IDS and warm.all() and np.array_equal(back, emb)


@pytest.mark.parametrize("values", [[], [""], ["a", "", "bé", "日本語 title", "x" * 1000, "\x00nul", "a"]])
def test_packed_strings_round_trip(values):
    assert unpack_strings(pack_strings(values)) == values


def test_the_catalog_lists_are_stored_packed_and_come_back_as_lists(model, tmp_path):
    adapter = published(model)
    path = save_adapter(adapter, tmp_path / ADAPTER_FILE)
    raw = load_torch_file(path)  # the file as written, before load_adapter unpacks it
    assert not isinstance(raw["item_ids"], list) and not isinstance(raw["extra"]["item_texts"], list)
    back = load_adapter(path)
    assert back["item_ids"] == list(adapter["item_ids"])
    assert {k: back["extra"][k] for k in CATALOG_KEYS} == {k: list(adapter["extra"][k]) for k in CATALOG_KEYS}
    # an adapter written with plain lists (before packing) still loads
    torch.save(adapter, tmp_path / "plain.pt")
    assert load_adapter(tmp_path / "plain.pt")["item_ids"] == list(adapter["item_ids"])


def test_manifest_payload_and_data_window_have_exactly_the_documented_fields(tmp_path):
    catalog = Catalog(IDS, TITLES, TEXTS, np.ones(N_ITEMS, dtype=bool))
    corpus = Corpus(catalog, ["u0", "u1"], [np.array([0, 1, 2], dtype=np.int32), np.array([3, 4], dtype=np.int32)],
                    [np.array([10, 20, 30], dtype=np.int64), np.array([15, 25], dtype=np.int64)],
                    partitions=[np.zeros(3, dtype=np.int32), np.ones(2, dtype=np.int32)],
                    offsets=[np.array([0, 1, 2], dtype=np.int64), np.array([0, 1], dtype=np.int64)],
                    watermarks={"events": {"0": 1, "1": 0}, "items": {"0": 9}})
    window = data_window(corpus)
    assert set(window) == DATA_WINDOW_FIELDS
    assert window["max_ts"] == 30 and window["events"] == 5
    # Past the window: the events above each partition's watermark (offsets), else above max_ts.
    assert [m.tolist() for m in new_event_masks(corpus, {"watermarks": {"events": {"0": 1, "1": 0}}})] == [
        [False, False, True], [False, True]]
    assert [m.tolist() for m in new_event_masks(corpus, {"max_ts": 20})] == [[False, False, True], [False, True]]

    cfg = ModelConfig(base_model=resolve_base_model(None))
    payload = manifest_payload(model_config=cfg, train_config=TrainConfig(), window=window,
                               metrics={"val_ndcg10": 0.3}, run_dir=tmp_path, workers=2, use_gpu=False,
                               incremental=True)
    assert set(payload) == MANIFEST_FIELDS
    assert payload["data_window"] == window and payload["base_model_sha256"]


def _py_sources(dirs: tuple[str, ...]) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_other_module_defines_the_file_names_or_calls_torch_load():
    names = {ADAPTER_FILE, EMBEDDINGS_FILE}
    found = []
    name_sources = set(_py_sources(NAME_DIRS))
    for path in _py_sources(SOURCE_DIRS):
        if path == CONTRACT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and path in name_sources:
                found.append(f"{rel}:{node.lineno}: the literal {node.value!r}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in ("ADAPTER_FILE", "EMBEDDINGS_FILE"):
                        found.append(f"{rel}:{node.lineno}: defines {t.id}")
            elif isinstance(node, ast.Attribute) and node.attr == "load" and ast.unparse(node.value) == "torch":
                found.append(f"{rel}:{node.lineno}: torch.load")
            elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{rel}:{node.lineno}: from torch import load")
    assert not found, "the adapter's file names and loading belong to training/adapter.py:\n" + "\n".join(found)


def test_the_scan_sees_the_contract_itself():
    tree = ast.parse(CONTRACT.read_text(encoding="utf-8"))
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "load"
             and ast.unparse(n.value) == "torch"]
    assert len(loads) == 1  # load_torch_file
