"""The embedded demo's settings: stratos_lite/demo.toml, with a user's file of changes laid over it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..storage.files import read_toml

DEMO_TOML = Path(__file__).with_name("demo.toml")  # the demo's settings: the one place its numbers live


def _demo_toml(key: str):
    """One of demo.toml's settings or sections, read afresh (a section is a dict the caller may change)."""
    return read_toml(DEMO_TOML)[key]


@dataclass
class DemoConfig:
    """The demo's settings; every default is stratos_lite/demo.toml's, where each number's reason is written."""
    out_dir: str = field(default_factory=lambda: _demo_toml("out_dir"))
    seed: int = field(default_factory=lambda: _demo_toml("seed"))
    vendored_base: bool = field(default_factory=lambda: _demo_toml("vendored_base"))
    data: dict = field(default_factory=lambda: _demo_toml("data"))
    model: dict = field(default_factory=lambda: _demo_toml("model"))
    base: dict = field(default_factory=lambda: _demo_toml("base"))
    dora: dict = field(default_factory=lambda: _demo_toml("dora"))
    eval: dict = field(default_factory=lambda: _demo_toml("eval"))
    export: dict = field(default_factory=lambda: _demo_toml("export"))

    @classmethod
    def from_toml(cls, path: str | Path = DEMO_TOML) -> DemoConfig:
        """demo.toml with a user's file over it: a setting given there replaces the default, section by section
        (a file holding only `seed = 1` changes only the seed)."""
        values = read_toml(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(values.keys() - known)
        if unknown:
            raise ValueError(f"{path}: unknown section or setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        defaults = cls()
        merged = {k: ({**getattr(defaults, k), **v} if isinstance(v, dict) else v) for k, v in values.items()}
        return cls(**merged)


def phase_config(config: DemoConfig, phase: str, **changes) -> TrainConfig:
    """The TrainConfig of the demo's "base" or "dora" phase: its section over the settings both share."""
    shared = {"out_dir": str(Path(config.out_dir) / phase), "seed": config.seed, "dtype": "auto",
              "gradient_checkpointing": False, "warmup_ratio": 0.05, "max_grad_norm": 1.0}
    return TrainConfig(**{**shared, **getattr(config, phase), **changes})
