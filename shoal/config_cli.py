"""The configuration layer on the command line: ``shoal config show``, and the servers'
options taking their defaults from `shoal.config` (so a flag beats the environment, which
beats the file, which beats the default)."""

from __future__ import annotations

import json
from typing import Any

import click

from .config import SETTINGS, Config, ConfigError, load_config

#: command -> {option parameter: config key}: where each option's default comes from
OPTION_KEYS: dict[str, dict[str, str]] = {
    "scheduler": {
        "host": "scheduler.host", "port": "scheduler.port",
        "worker_ttl": "scheduler.worker_ttl", "jobs_url": "scheduler.jobs_url",
        "dashboard_address": "dashboard.scheduler_address",
    },
    "worker": {
        "nthreads": "worker.nthreads", "name": "worker.name", "host": "worker.host",
        "port": "worker.port", "memory_limit": "worker.memory_limit",
        "memory_fractions": "worker.memory_fractions", "nanny": "worker.nanny",
        "resources": "worker.resources", "death_timeout": "worker.death_timeout",
        "lifetime": "worker.lifetime", "lifetime_stagger": "worker.lifetime_stagger",
        "connect_timeout": "comm.connect_timeout",
        "heartbeat_interval": "comm.heartbeat_interval",
        "dashboard_address": "dashboard.worker_address",
    },
}  # fmt: skip
#: options both server commands share
_SHARED = {
    "token": "security.token", "token_file": "security.token_file",
    "insecure": "security.insecure", "max_frame_bytes": "security.max_frame_bytes",
    "tls_ca_file": "tls.ca_file", "tls_cert": "tls.cert", "tls_key": "tls.key",
    "log_level": "logging.level", "dashboard": "dashboard.enabled",
}  # fmt: skip
for _keys in OPTION_KEYS.values():
    _keys.update(_SHARED)


def load_or_fail() -> Config:
    try:
        return load_config()
    except ConfigError as exc:
        raise click.UsageError(f"configuration: {exc}") from None


class ConfiguredCommand(click.Command):
    """A server command whose options default to the effective configuration."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:  # fmt: skip
        if "default_map" not in extra:
            config = load_or_fail()
            keys = OPTION_KEYS.get(self.name or "", {})
            # Unset values keep the option's own default (e.g. --log-level info).
            extra["default_map"] = {param: config.get(key) for param, key in keys.items()
                                    if config.get(key) is not None}  # fmt: skip
        return super().make_context(info_name, args, parent, **extra)


@click.group("config")
def config_group() -> None:
    """The effective configuration (shoal.toml < SHOAL_* environment < flags)."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--reveal", is_flag=True, help="Show secrets (the token) instead of ***.")
def config_show(as_json: bool, reveal: bool) -> None:
    """Print every setting, its value and where the value came from.

    Flags of `shoal scheduler` / `shoal worker` override these for that command.
    """
    config = load_or_fail()
    rows = config.rows(reveal=reveal)
    if as_json:
        click.echo(json.dumps({
            "file": str(config.file) if config.file else None,
            "settings": {key: {"value": value, "source": source,
                               "env": SETTINGS[key].env_var}
                         for key, value, source in rows},
        }, indent=2))  # fmt: skip
        return
    click.echo(f"# config file: {config.file or 'none'}")
    width = max(len(key) for key, _, _ in rows)
    shown = [(key, _show(value)) for key, value, _ in rows]
    value_width = min(40, max(len(text) for _, text in shown))
    for (key, text), (_, _, source) in zip(shown, rows):
        click.echo(f"{key:<{width}}  {text:<{value_width}}  {source}")


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)
