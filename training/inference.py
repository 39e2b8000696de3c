"""Scoring with a trained `Recommender`: item embeddings once, user embeddings per batch.

`ModelScorer` is the `training.evaluation.Scorer` of the neural models (fine-tuned and the
ID-only SASRec-style baseline); serving uses the same `user_vectors` path.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from training.corpus import history_features
from training.calibration import calibrate_new_items
from training.covis import CovisPrior
from training.model import Recommender

COLD_SCORE = -1e4  # items a content-free model cannot place rank last


class ModelScorer:
    def __init__(self, model: Recommender, name: str, *, device: str = "cpu", item_table: np.ndarray | None = None,
                 refresh: bool = True, prior: CovisPrior | None = None) -> None:
        self.model = model.to(device).eval()
        self.name = name
        self.prior = prior
        self.device = device
        with torch.no_grad():
            if item_table is None:
                if refresh:
                    model.refresh_text_cache()
                table = model.item_table()
            else:
                table = torch.cat([torch.zeros(1, item_table.shape[1]), torch.from_numpy(item_table)]).to(device)
        self.table = table
        self.items = table[1:].cpu().numpy()
        # Without text, an item with no training interactions has no embedding at all.
        self.new_items = ~model.warm[1:].bool().cpu().numpy()
        self.unscorable = None if model.text is not None else self.new_items

    @property
    def content_free(self) -> bool:
        return self.model.text is None

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray],
                     now_ts: np.ndarray | None = None) -> np.ndarray:
        inputs, gaps = history_features(histories, history_ts, now_ts, self.model.cfg.max_len)
        u = self.model.user_embedding(torch.from_numpy(inputs).to(self.device), torch.from_numpy(gaps).to(self.device),
                                      self.table)
        return u.cpu().numpy()

    def neural_scores(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray],
                      now_ts: np.ndarray) -> np.ndarray:
        """cos(user, item) for every item: the two towers alone."""
        return self.user_vectors(histories, history_ts, now_ts) @ self.items.T

    def finish(self, scores: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Scoring policy after the towers and the prior: new-item calibration, unscorable items last."""
        if self.model.text is not None and self.model.cfg.new_item_calibration:
            scores = calibrate_new_items(scores, histories, self.new_items)
        if self.unscorable is not None:
            scores = scores.copy()
            scores[:, self.unscorable] = COLD_SCORE
        return scores.astype(np.float32)

    def score(self, histories: Sequence[np.ndarray], history_ts: Sequence[np.ndarray], now_ts: np.ndarray) -> np.ndarray:
        scores = self.neural_scores(histories, history_ts, now_ts)
        if self.prior is not None and self.prior.beta > 0:
            scores = scores + self.prior.boost(histories, history_ts, now_ts)
        return self.finish(scores, histories)
