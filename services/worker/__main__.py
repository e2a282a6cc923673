"""python -m services.worker --stages encode,prefill,decode --help"""
from prism.runtime.host import StageSpec
from prism.runtime.main import run_worker
from services.decode.app import build as build_decode
from services.encoder.app import build as build_encoder
from services.prefill.app import build as build_prefill
from services.worker.config import WorkerConfig

BUILDS = {"encode": build_encoder, "prefill": build_prefill, "decode": build_decode}


def specs(config: WorkerConfig) -> list[StageSpec]:
    return [StageSpec(stage, cfg, BUILDS[stage], slots=getattr(cfg, "slots", 0), capacity=cfg.capacity)
            for stage, cfg in config.stage_configs().items()]


if __name__ == "__main__":
    run_worker(specs, WorkerConfig, "PRISM_WORKER", "prism-worker", "python -m services.worker")
