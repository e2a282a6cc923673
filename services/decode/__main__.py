"""python -m services.decode --help"""
from prism.runtime.main import run_service
from services.decode.app import build
from services.decode.config import DecodeConfig

if __name__ == "__main__":
    run_service(DecodeConfig, "PRISM_DECODE", "prism-decode", build, "python -m services.decode")
