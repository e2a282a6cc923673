"""python -m services.encoder --help"""
from prism.runtime.host import StageSpec
from prism.runtime.main import run_worker
from services.encoder.app import build
from services.encoder.config import EncoderConfig


def specs(config: EncoderConfig) -> list[StageSpec]:
    return [StageSpec("encode", config, build, slots=0, capacity=config.capacity)]


if __name__ == "__main__":
    run_worker(specs, EncoderConfig, "PRISM_ENCODER", "prism-encoder", "python -m services.encoder")
