"""python -m services.decode --help"""
from prism.runtime.host import StageSpec
from prism.runtime.main import run_worker
from services.decode.app import build
from services.decode.config import DecodeConfig


def specs(config: DecodeConfig) -> list[StageSpec]:
    return [StageSpec("decode", config, build, slots=config.slots, capacity=config.capacity)]


if __name__ == "__main__":
    run_worker(specs, DecodeConfig, "PRISM_DECODE", "prism-decode", "python -m services.decode")
