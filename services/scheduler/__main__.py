"""python -m services.scheduler --help"""
from prism.runtime.main import run_service
from services.scheduler.app import build
from services.scheduler.config import SchedulerConfig

if __name__ == "__main__":
    run_service(SchedulerConfig, "PRISM_SCHEDULER", "prism-scheduler", build, "python -m services.scheduler")
