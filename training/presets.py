"""Named model + training sizes, so that a command line can ask for "quick" without a dozen flags.

    streamrec train --preset quick           # a small head and 4 epochs: minutes on a laptop CPU
    streamrec up --preset quick              # the continuous trainer uses it for every run

`default` is what the benchmarks in the README were measured with. `quick` keeps the same model
(MiniLM + LoRA + a Transformer head) at a size where a first adapter on a few thousand events
trains in about a minute on two CPU cores: the demo's `--quick` mode and the end-to-end test use it.
An incremental run keeps its parent's model config whatever the preset (the shapes must match);
only the training knobs of the preset apply to it.

A name may end in `+OPTION` (`PRESET_OPTIONS`) to switch a training option on, so that every command
taking `--preset` (train, train-loop, up, demo) can ask for it:

    streamrec up --preset quick+hard-negatives   # shown-but-not-clicked items as negatives (training/hard_negatives.py)
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


# `<preset>+<option>`: TrainConfig fields an option sets (off by default until the simulator shows they win).
PRESET_OPTIONS: dict[str, dict[str, object]] = {
    "hard-negatives": {"hard_negatives": True},
}


def get_preset(name: str) -> Preset:
    base, *options = name.split("+")
    try:
        preset = PRESETS[base]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}, optionally followed by "
                         f"{' '.join('+' + o for o in PRESET_OPTIONS)}") from None
    for option in options:
        if option not in PRESET_OPTIONS:
            raise ValueError(f"unknown preset option {option!r} in {name!r}: choose from "
                             f"{', '.join('+' + o for o in PRESET_OPTIONS)}")
        preset = dataclasses.replace(preset, name=name,
                                     train=dataclasses.replace(preset.train, **PRESET_OPTIONS[option]))
    return preset


__all__ = ["PRESETS", "PRESET_OPTIONS", "Preset", "get_preset"]
