"""python -m services.encoder --help"""
from prism.runtime.main import run_service
from services.encoder.app import build
from services.encoder.config import EncoderConfig

if __name__ == "__main__":
    run_service(EncoderConfig, "PRISM_ENCODER", "prism-encoder", build, "python -m services.encoder")
