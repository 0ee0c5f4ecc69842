"""W&B goes online only when credentials are configured and its server answers within a few seconds, so
a run never waits on the network."""

from __future__ import annotations

import socket
import time

import pytest

from normbench.loggers import REACH_TIMEOUT_S, wandb_mode


@pytest.fixture
def wandb_server(monkeypatch):
    """A local port that accepts connections, as W&B's server (`auto` checks only that it answers)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield server


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


def test_offline_without_credentials(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "offline"


def test_online_with_an_api_key_in_the_environment(wandb_env, wandb_server, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_online_with_a_netrc_entry_for_the_wandb_host(wandb_env, wandb_server, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode("auto") == "offline"  # the key is for another host


def test_explicit_settings_win(wandb_env, monkeypatch):
    assert wandb_mode("online") == "offline"  # WANDB_MODE=offline from the fixture wins
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("offline") == "offline"
    assert wandb_mode("online") == "online"


def test_offline_in_one_line_when_the_server_does_not_answer(wandb_env, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    start = time.perf_counter()
    assert wandb_mode("auto") == "offline" and time.perf_counter() - start < REACH_TIMEOUT_S
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"normbench: warning: W&B credentials are configured but {url} is not reachable ([Errno 111] "
        "Connection refused): logging offline")
    assert wandb_mode("online") == "online"  # asked for by name: W&B's own behaviour
