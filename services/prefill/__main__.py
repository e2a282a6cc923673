"""python -m services.prefill --help"""
from prism.runtime.host import StageSpec
from prism.runtime.main import run_worker
from services.prefill.app import build
from services.prefill.config import PrefillConfig


def specs(config: PrefillConfig) -> list[StageSpec]:
    return [StageSpec("prefill", config, build, slots=0, capacity=config.capacity)]


if __name__ == "__main__":
    run_worker(specs, PrefillConfig, "PRISM_PREFILL", "prism-prefill", "python -m services.prefill")
