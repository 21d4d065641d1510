"""Configuration: sizes and durations parse as documented, invalid values
fail when a channel wrapper or server interceptor is built (never at import)
with ConfigError naming the variable."""

from __future__ import annotations

import logging

import grpc
import pytest

import shmgrpc
from shmgrpc.config import ENV, Config
from tests.conftest import run_python

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    "text, value",
    [
        ("65536", 65536),
        ("64KiB", 64 * KiB),
        ("64K", 64 * KiB),
        ("64kb", 64 * KiB),
        ("1MiB", MiB),
        ("1M", MiB),
        (" 2 GiB ", 2 * GiB),
    ],
)
def test_sizes(text, value):
    config = Config.from_env(
        {"SHMGRPC_THRESHOLD": text, "SHMGRPC_POOL_SIZE": text if value >= MiB else "1GiB"}
    )
    assert config.threshold == value


@pytest.mark.parametrize("text, seconds", [("30", 30.0), ("0.3s", 0.3), ("500ms", 0.5), ("2m", 120.0)])
def test_lease(text, seconds):
    assert Config.from_env({"SHMGRPC_LEASE": text}).lease_seconds == pytest.approx(seconds)


def test_every_variable_is_read(tmp_path):
    env = {
        "SHMGRPC_THRESHOLD": "128K",
        "SHMGRPC_TRANSPORT": "CMA",
        "SHMGRPC_POOL_SIZE": "64MiB",
        "SHMGRPC_SEGMENT_SIZE": "1MiB",
        "SHMGRPC_MAX_MESSAGE": "32M",
        "SHMGRPC_LEASE": "5s",
        "SHMGRPC_CMA_MAX_PINNED": "16MiB",
        "SHMGRPC_CMA_THRESHOLD": "1MiB",
        "SHMGRPC_PEER_SHARE": "25%",
        "SHMGRPC_SHM_DIR": "/run/shm",
        "SHMGRPC_SIDE_DIR": str(tmp_path),
        "SHMGRPC_SIDE_UIDS": "1000, 1001",
        "SHMGRPC_MALLOC": "Keep",
    }
    assert set(env) == set(ENV)
    config = Config.from_env(env)
    assert (config.threshold, config.transport, config.pool_size, config.segment_size) == (
        128 * KiB,
        "cma",
        64 * MiB,
        1 * MiB,
    )
    assert config.cma_threshold == 1 * MiB
    assert config.peer_share == 0.25
    assert (config.max_message, config.lease_seconds, config.cma_max_pinned, config.shm_dir) == (
        32 * MiB,
        5.0,
        16 * MiB,
        "/run/shm",
    )
    assert (config.side_dir, config.side_uids, config.malloc) == (str(tmp_path), (1000, 1001), "keep")
    # blank means unset; overrides beat the environment
    assert Config.from_env({"SHMGRPC_THRESHOLD": "  "}).threshold == Config().threshold
    assert Config.from_env({"SHMGRPC_THRESHOLD": "1M"}, threshold=5).threshold == 5


BAD = {
    "SHMGRPC_THRESHOLD": ["banana", "-1", "0", "1.5M", "64 Kibibytes"],
    "SHMGRPC_TRANSPORT": ["tcp", "shm,cma"],
    "SHMGRPC_MALLOC": ["always", "1"],
    "SHMGRPC_POOL_SIZE": ["lots"],
    "SHMGRPC_SEGMENT_SIZE": ["4K"],
    "SHMGRPC_MAX_MESSAGE": ["1Q"],
    "SHMGRPC_LEASE": ["0", "soon", "-1s"],
    "SHMGRPC_CMA_MAX_PINNED": ["x"],
    "SHMGRPC_PEER_SHARE": ["0", "1.5", "150%", "half", "-0.5"],
    "SHMGRPC_SHM_DIR": ["relative/dir"],
    "SHMGRPC_SIDE_DIR": ["relative/dir"],
    "SHMGRPC_SIDE_UIDS": ["root", "-1"],
}


def build(kind: str):
    """What reads the SHMGRPC_* environment: a channel wrapper (both ways of
    making one) or a server interceptor (both ways of installing one)."""
    if kind == "intercept_channel":
        channel = grpc.insecure_channel("127.0.0.1:1")
        try:
            return shmgrpc.intercept_channel(channel)
        finally:
            channel.close()
    if kind == "insecure_channel":
        return shmgrpc.insecure_channel("127.0.0.1:1")
    if kind == "server":
        return shmgrpc.server(None)
    return shmgrpc.ServerInterceptor()


KINDS = ["intercept_channel", "insecure_channel", "server", "ServerInterceptor"]


@pytest.mark.parametrize(
    "var, text", [(var, text) for var, texts in BAD.items() for text in texts], ids=lambda v: str(v)
)
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_value_raises_when_a_wrapper_or_interceptor_is_built(monkeypatch, kind, var, text):
    monkeypatch.setenv(var, text)
    with pytest.raises(shmgrpc.ConfigError) as info:
        build(kind)
    assert var in str(info.value) and repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", KINDS)
def test_transport_error_lists_the_accepted_values(monkeypatch, kind):
    monkeypatch.setenv("SHMGRPC_TRANSPORT", "tcp")
    with pytest.raises(shmgrpc.ConfigError, match="auto, memfd, shm, cma, off"):
        build(kind)


def test_invalid_fields_raise_too():
    with pytest.raises(shmgrpc.ConfigError, match="threshold"):
        Config(threshold=0)
    with pytest.raises(shmgrpc.ConfigError, match="transport"):
        Config(transport="udp")


def test_environment_is_read_at_build_not_import():
    """Importing with garbage in the environment is fine; building is not.
    And a value set after import is the one a wrapper uses."""
    out = run_python(
        """
import json, os
import shmgrpc
imported = True
try:
    shmgrpc.insecure_channel("127.0.0.1:1")
    error = None
except shmgrpc.ConfigError as err:
    error = str(err)
os.environ["SHMGRPC_THRESHOLD"] = "1MiB"
channel = shmgrpc.insecure_channel("127.0.0.1:1")
print(json.dumps({"imported": imported, "error": error,
                  "threshold": channel._engine.config.threshold, "transport": channel.transport}))
channel.close()
""",
        env={"SHMGRPC_THRESHOLD": "banana"},
    )
    assert out["imported"] is True
    assert out["error"] and "SHMGRPC_THRESHOLD" in out["error"] and "'banana'" in out["error"]
    assert out["threshold"] == MiB and out["transport"] == "auto"


@pytest.fixture
def config_warnings(monkeypatch, caplog):
    """WARNING records of shmgrpc.config, with the once-per-process memory
    emptied for the test."""
    from shmgrpc import config

    monkeypatch.setattr(config, "_warned", set())
    caplog.set_level(logging.WARNING, logger="shmgrpc.config")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "shmgrpc.config"]


def test_a_misspelt_variable_is_named_once_with_the_closest_known_name(config_warnings):
    env = {"SHMGRPC_TRESHOLD": "1MiB", "SHMGRPC_TRANSPORT": "shm"}
    config = Config.from_env(env)
    assert config.threshold == Config().threshold and config.transport == "shm"  # ignored; the rest read
    assert config_warnings() == [
        "SHMGRPC_TRESHOLD is not a shmgrpc setting (did you mean SHMGRPC_THRESHOLD?); ignored"]
    Config.from_env(env)
    Config.from_env({**env, "SHMGRPC_POOLSIZE": "1GiB", "shmgrpc_malloc": "keep"})
    assert config_warnings()[1:] == [  # once per name: only the new names, the lower-case one included
        "SHMGRPC_POOLSIZE is not a shmgrpc setting (did you mean SHMGRPC_POOL_SIZE?); ignored",
        "shmgrpc_malloc is not a shmgrpc setting (did you mean SHMGRPC_MALLOC?); ignored"]


def test_an_unknown_variable_without_a_close_name_lists_the_known_ones(config_warnings):
    Config.from_env({"SHMGRPC_WIBBLE": "1"})
    (message,) = config_warnings()
    assert message.startswith("SHMGRPC_WIBBLE is not a shmgrpc setting (known: SHMGRPC_THRESHOLD, ")
    assert all(name in message for name in ENV) and message.endswith("); ignored")


def test_known_variables_and_other_prefixes_draw_no_warning(config_warnings, tmp_path):
    env = {name: "" for name in ENV}  # every known name, set (empty: the default)
    env.update({"SHMGRPC_TRANSPORT": "memfd", "GRPC_VERBOSITY": "debug", "XSHMGRPC_THRESHOLD": "1", "PATH": "/bin"})
    Config.from_env(env)
    assert config_warnings() == []
