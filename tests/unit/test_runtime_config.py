"""Unit tests for prism.runtime.config: frozen dataclass configs from argparse + environment."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from prism.runtime.config import (
    ConfigError,
    add_dataclass_arguments,
    check,
    config_from_cli,
    dataclass_from_args,
)
from prism.runtime.server import ServerConfig


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sample config."""

    model_dir: Path = dataclasses.field(metadata={"help": "where the checkpoint lives"})
    max_batch: int = dataclasses.field(default=8, metadata={"help": "most items per batch (100%)"})
    scale: float = dataclasses.field(default=1.5, metadata={"help": "a factor"})
    name: str = dataclasses.field(default="enc", metadata={"help": "a name"})
    warmup: bool = dataclasses.field(default=True, metadata={"help": "run a warm-up pass"})
    upstreams: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "addresses"})
    sizes: tuple[int, ...] = dataclasses.field(default=(1, 2), metadata={"help": "sizes"})
    dtype: Literal["float32", "bfloat16"] = dataclasses.field(
        default="float32", metadata={"help": "compute dtype"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "optional limit"})

    def __post_init__(self) -> None:
        check(self.max_batch >= 1, "max_batch", f"must be >= 1, got {self.max_batch}")
        if self.scale == 13.0:
            raise ValueError("unlucky scale")


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage config embedding the server config."""

    server: ServerConfig = dataclasses.field(default_factory=lambda: ServerConfig(port=7000))
    queue_depth: int = dataclasses.field(default=64, metadata={"help": "queue bound"})


def parse(cls, argv, environ=None, prefix="PRISM_TEST"):
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, cls, prefix, environ=environ or {})
    ns = parser.parse_args(argv)
    return dataclass_from_args(cls, ns, parser=parser)


def test_defaults_and_types() -> None:
    cfg = parse(Sample, ["--model-dir", "/models/x"])
    assert cfg == Sample(model_dir=Path("/models/x"))
    assert isinstance(cfg.model_dir, Path)


def test_every_type_from_the_command_line() -> None:
    cfg = parse(Sample, ["--model-dir", "m", "--max-batch", "4", "--scale", "0.5", "--name", "x",
                         "--no-warmup", "--upstreams", "a:1, b:2,,", "--sizes", "3,4",
                         "--dtype", "bfloat16", "--limit", "9"])
    assert cfg == Sample(model_dir=Path("m"), max_batch=4, scale=0.5, name="x", warmup=False,
                         upstreams=("a:1", "b:2"), sizes=(3, 4), dtype="bfloat16", limit=9)
    assert parse(Sample, ["--model-dir", "m", "--limit", "none"]).limit is None
    assert parse(Sample, ["--model-dir", "m", "--upstreams", ""]).upstreams == ()


def test_environment_overrides_defaults_and_cli_overrides_environment() -> None:
    env = {"PRISM_TEST_MODEL_DIR": "/env/m", "PRISM_TEST_MAX_BATCH": "16",
           "PRISM_TEST_WARMUP": "off", "PRISM_TEST_UPSTREAMS": "h1:1,h2:2",
           "PRISM_TEST_LIMIT": "", "OTHER_MAX_BATCH": "99"}
    cfg = parse(Sample, [], env)
    assert cfg.model_dir == Path("/env/m") and cfg.max_batch == 16 and cfg.warmup is False
    assert cfg.upstreams == ("h1:1", "h2:2") and cfg.limit is None
    cfg = parse(Sample, ["--max-batch", "2", "--warmup"], env)
    assert cfg.max_batch == 2 and cfg.warmup is True


@pytest.mark.parametrize("text,value", [("1", True), ("TRUE", True), ("yes", True), ("on", True),
                                        ("0", False), ("false", False), ("No", False)])
def test_bool_environment_spellings(text: str, value: bool) -> None:
    assert parse(Sample, ["--model-dir", "m"], {"PRISM_TEST_WARMUP": text}).warmup is value


def test_required_field_missing_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        parse(Sample, [])
    assert err.value.code == 2
    assert "--model-dir" in capsys.readouterr().err


def test_bad_cli_value_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(Sample, ["--model-dir", "m", "--max-batch", "many"])
    err = capsys.readouterr().err
    assert "--max-batch" in err and "expected int" in err
    with pytest.raises(SystemExit):
        parse(Sample, ["--model-dir", "m", "--dtype", "int8"])
    assert "float32, bfloat16" in capsys.readouterr().err


def test_bad_environment_value_names_the_variable(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        parse(Sample, ["--model-dir", "m"], {"PRISM_TEST_SCALE": "big"})
    assert err.value.code == 2
    assert "PRISM_TEST_SCALE" in capsys.readouterr().err


def test_validation_error_names_the_option(capsys) -> None:
    with pytest.raises(SystemExit) as err:
        parse(Sample, ["--model-dir", "m", "--max-batch", "0"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "--max-batch (PRISM_TEST_MAX_BATCH): must be >= 1, got 0" in msg
    assert "Traceback" not in msg


def test_plain_value_error_is_a_clean_usage_error(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(Sample, ["--model-dir", "m", "--scale", "13"])
    assert "invalid Sample: unlucky scale" in capsys.readouterr().err


def test_without_parser_errors_propagate() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Sample, "", environ={})
    ns = parser.parse_args(["--model-dir", "m", "--max-batch", "0"])
    with pytest.raises(ConfigError) as err:
        dataclass_from_args(Sample, ns)
    assert err.value.field == "max_batch"


def test_help_text_shows_env_and_default(capsys) -> None:
    parser = argparse.ArgumentParser(prog="t")
    add_dataclass_arguments(parser, Sample, "PRISM_TEST", environ={"PRISM_TEST_NAME": "from-env"})
    help_text = " ".join(parser.format_help().split())
    assert "most items per batch (100%) (env PRISM_TEST_MAX_BATCH; default: 8)" in help_text
    assert "(env PRISM_TEST_NAME; default: from-env)" in help_text
    assert "--warmup, --no-warmup" in help_text
    assert "default: 1,2" in help_text


def test_nested_dataclass_is_flattened() -> None:
    cfg = parse(Stage, [], {"PRISM_TEST_HOST": "0.0.0.0"})
    assert cfg.server.port == 7000  # the outer field's default factory
    assert cfg.server.host == "0.0.0.0" and cfg.queue_depth == 64
    cfg = parse(Stage, ["--port", "0", "--port-file", "/tmp/p", "--no-otel",
                        "--drain-grace-s", "2.5", "--worker-name", "w"])
    assert cfg.server == ServerConfig(port=0, port_file=Path("/tmp/p"), otel=False,
                                      drain_grace_s=2.5, worker_name="w")


def test_nested_validation_error_names_the_option(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(Stage, ["--port", "99999"])
    assert "--port (PRISM_TEST_PORT): must be in 0..65535" in capsys.readouterr().err


def test_config_from_cli() -> None:
    cfg = config_from_cli(Sample, "PRISM_X", ["--model-dir", "m"],
                          environ={"PRISM_X_MAX_BATCH": "3"})
    assert cfg.max_batch == 3 and cfg.model_dir == Path("m")


def test_unsupported_types_rejected() -> None:
    @dataclasses.dataclass(frozen=True)
    class Bad:
        mapping: dict[str, int] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad, "", environ={})
    with pytest.raises(TypeError):
        add_dataclass_arguments(argparse.ArgumentParser(), int, "")  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    cfg = parse(Sample, ["--model-dir", "m"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch = 3  # type: ignore[misc]
