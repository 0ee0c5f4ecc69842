"""W&B goes online only when credentials are configured, so a run never waits on the network."""

from __future__ import annotations

from normbench.loggers import wandb_mode


def test_offline_without_credentials(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode("auto") == "offline"


def test_online_with_an_api_key_in_the_environment(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_online_with_a_netrc_entry_for_the_wandb_host(wandb_env, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
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
