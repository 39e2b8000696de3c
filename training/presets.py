"""Named model + training sizes, so that a command line can ask for "quick" without a dozen flags.

    streamrec train --preset quick           # a small head and 4 epochs: minutes on a laptop CPU
    streamrec up --preset quick              # the continuous trainer uses it for every run

`default` is what the benchmarks in the README were measured with. `quick` keeps the same model
(MiniLM + LoRA + a Transformer head) at a size where a first adapter on a few thousand events
trains in about a minute on two CPU cores: the demo's `--quick` mode and the end-to-end test use it.
An incremental run keeps its parent's model config whatever the preset (the shapes must match);
only the training knobs of the preset apply to it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from training.train_step import TrainConfig
from training.model import ModelConfig


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig
    incremental_epochs: int  # epochs of an incremental run (new events + replay): fewer than from scratch

    def train_config(self, incremental: bool) -> TrainConfig:
        """The training knobs of a run from scratch, or of an incremental one (fewer epochs)."""
        return dataclasses.replace(self.train, epochs=self.incremental_epochs) if incremental else self.train


PRESETS: dict[str, Preset] = {
    # the README's benchmark configuration: 25 epochs, dim 64, 2 LoRA layers
    "default": Preset("default", ModelConfig(), TrainConfig(), incremental_epochs=8),
    # the MovieLens demo: the default model, 8 epochs
    "demo": Preset("demo", ModelConfig(), TrainConfig(epochs=8), incremental_epochs=3),
    # small and fast (the demo's --quick and the tests): dim 32, one LoRA layer, 4 epochs
    "quick": Preset("quick", ModelConfig(dim=32, max_len=20, heads=2, blocks=1, lora_layers=1),
                    TrainConfig(epochs=4, batch_size=64, lr=3e-3, fresh_items=16, refresh_every=2),
                    incremental_epochs=2),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


__all__ = ["PRESETS", "Preset", "get_preset"]
