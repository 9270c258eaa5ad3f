"""Train a diffusion model: `python train.py experiment=<name> [group=option] [key=value ...]`."""
import hydra
from omegaconf import DictConfig

from src.pipeline import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)["metrics"]
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
