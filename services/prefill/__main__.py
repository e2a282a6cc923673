"""python -m services.prefill --help"""
from prism.runtime.main import run_service
from services.prefill.app import build
from services.prefill.config import PrefillConfig

if __name__ == "__main__":
    run_service(PrefillConfig, "PRISM_PREFILL", "prism-prefill", build, "python -m services.prefill")
