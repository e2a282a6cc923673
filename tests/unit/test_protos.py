"""The protos as a contract, checked by buf (from npm, clients/node): they lint clean, and
nothing breaks wire or source compatibility with the last released descriptor
(protos/released/prism-v1.binpb); a planted lint error and a planted breaking change fail."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
RELEASED = PROTOS / "released" / "prism-v1.binpb"


@pytest.fixture(scope="module")
def buf() -> str:
    binary = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"
    if not binary.exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=binary.parents[2], check=True, timeout=600)
    return str(binary)


def run(buf: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def planted(tmp_path: Path, old: str, new: str) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    target = copy / "prism" / "v1" / "prism.proto"
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    return copy


def test_protos_lint_clean_and_keep_compatibility_with_the_release(buf):
    lint = run(buf, PROTOS, "lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = run(buf, PROTOS, "breaking", "--against", str(RELEASED))
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_a_planted_breaking_change_fails(buf, tmp_path):
    copy = planted(tmp_path, "  int32 priority = 8;\n", "")  # a field removed from GenerateRequest
    out = run(buf, copy, "breaking", "--against", str(RELEASED))
    assert out.returncode != 0 and "priority" in out.stdout + out.stderr


def test_a_planted_lint_error_fails(buf, tmp_path):
    copy = planted(tmp_path, "int32 priority = 8;", "int32 Priority = 8;")  # not lower_snake_case
    out = run(buf, copy, "lint")
    assert out.returncode != 0 and "Priority" in out.stdout + out.stderr
