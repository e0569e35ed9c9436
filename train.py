"""Train a stage: ``python train.py experiment=ae_f8`` (see configs/ and the README)."""

import hydra
from omegaconf import DictConfig

import ldm.utils.config  # noqa: F401  (resolvers must exist before Hydra composes)
from ldm.training import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    monitor = cfg.get("optimized_metric")
    return metrics.get(monitor) if monitor else None


if __name__ == "__main__":
    main()
