"""End-to-end training on any backend: SAB on the copy and adding tasks, Memformer with MRBP
on segment recall. ``memcore train CONFIG.toml`` is :func:`memcore.train.cli.main`.

Importing this package imports no framework; the backend loads when training starts.
"""

from memcore.train.config import TrainConfig, load_config, parse_config
from memcore.train.evaluate import score
from memcore.train.trainer import train

__all__ = ["TrainConfig", "load_config", "parse_config", "score", "train"]
