"""One configuration layer: every setting of the servers and the client, in one typed schema.

Each value comes from the first of these that sets it (highest first):

1. a CLI flag (``shoal scheduler --port 9000``) or a keyword argument (``Client(timeout=5)``);
2. an environment variable ``SHOAL_<SECTION>__<KEY>`` (``SHOAL_SCHEDULER__PORT=9000``), or
   one of the older names kept as aliases (``SHOAL_TOKEN``, ``SHOAL_TLS_CERT``...);
3. the TOML file named by ``SHOAL_CONFIG``, else ``shoal.toml`` in the user's config
   directory (``$XDG_CONFIG_HOME/shoal/shoal.toml``, else ``~/.config/shoal/shoal.toml``);
4. the default here.

`load_config()` reads 2-4 and remembers where each value came from (`Config.source`);
`Config.override` adds 1. ``shoal config show`` prints the result. A value of the wrong
type or range, or a key the schema does not know, is a `ConfigError` naming the key, where
it came from and what is allowed. The layers below (core, protocol, comm) never read it:
their settings come in as arguments (the one exception, ``SHOAL_MAX_FRAME_BYTES``, is read
by `shoal.protocol.framing` itself and only listed here).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the dependency exists only there
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "SETTINGS",
    "Config",
    "ConfigError",
    "Setting",
    "config_path",
    "load_config",
    "parse_resources",
    "reference_table",
]  # fmt: skip

ENV_PREFIX = "SHOAL_"
#: the variable naming the config file (a missing file it names is an error)
CONFIG_ENV = "SHOAL_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A setting that cannot be used: names the key, where it came from, what is allowed."""


@dataclass(frozen=True)
class Meta:
    """What the schema says about one setting besides its type and default."""

    help: str
    #: older environment variables that set it too (kept working)
    aliases: tuple[str, ...] = ()
    #: where a user sets it per call: CLI flags and keyword arguments (for the docs)
    flags: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    #: the minimum itself is not allowed (e.g. timeouts > 0)
    exclusive_minimum: bool = False
    #: masked by ``shoal config show``
    secret: bool = False
    #: a further check of a string's form: raises ValueError saying what is wrong
    form: Callable[[str], object] | None = None


def parse_resources(text: str) -> dict[str, float]:
    """``"GPU=2,MEM=16e9"`` -> ``{"GPU": 2.0, "MEM": 16e9}``; ValueError naming a bad item."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"{item!r} is not NAME=AMOUNT") from None
    return out


def setting(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"shoal": Meta(help, **meta)})


# ----------------------------------------------------------------------- the schema

@dataclass(frozen=True)
class SchedulerSettings:
    host: str = setting("127.0.0.1", "Interface the scheduler listens on (0.0.0.0: all).",
                        flags=("shoal scheduler --host",))
    port: int = setting(8786, "Port the scheduler listens on (0: a free one).",
                        minimum=0, maximum=65535, flags=("shoal scheduler --port",))
    worker_ttl: float = setting(
        30.0, "Seconds of silence after which a worker is removed and its work moved.",
        minimum=0, exclusive_minimum=True,
        flags=("shoal scheduler --worker-ttl", "Scheduler(worker_ttl=)",
               "LocalCluster(worker_ttl=)"))
    jobs_url: str | None = setting(
        None, "A shoal.jobs queue for the dashboard to show (broker URL or MODULE:APP).",
        flags=("shoal scheduler --jobs-url",))


@dataclass(frozen=True)
class WorkerSettings:
    nthreads: int = setting(1, "Threads that run tasks in each worker.", minimum=1,
                            flags=("shoal worker --nthreads",))
    name: str | None = setting(None, "The worker's name (default: worker-PID).",
                               flags=("shoal worker --name",))
    host: str = setting("127.0.0.1", "Interface the worker listens on for its peers.",
                        flags=("shoal worker --host",))
    port: int = setting(0, "Port the worker listens on (0: any).", minimum=0, maximum=65535,
                        flags=("shoal worker --port",))
    memory_limit: str = setting(
        "auto", 'Memory a worker may use: bytes, "4GB", a fraction "0.5", "auto" or "0".',
        flags=("shoal worker --memory-limit",))
    memory_fractions: str = setting(
        "0.6,0.7,0.8,0.95,0.1",
        "TARGET,SPILL,PAUSE,TERMINATE,TRANSFER fractions of the memory limit ('none': off).",
        flags=("shoal worker --memory-fractions", "LocalCluster(memory_fractions=)"))
    nanny: bool = setting(True, "Run the worker under a nanny that restarts it.",
                          flags=("shoal worker --nanny/--no-nanny",))
    resources: str = setting("", 'Resources the worker offers, "GPU=2,MEM=16e9".',
                             form=parse_resources,
                             flags=("shoal worker --resources", "LocalCluster(resources=)"))
    death_timeout: float = setting(
        60.0, "Seconds a worker keeps trying to reach a lost scheduler before exiting.",
        minimum=0, exclusive_minimum=True,
        flags=("shoal worker --death-timeout", "Worker(reconnect_timeout=)"))
    lifetime: float | None = setting(
        None, "Seconds after which a worker retires gracefully (none: never).",
        minimum=0, exclusive_minimum=True, flags=("shoal worker --lifetime",))
    lifetime_stagger: float = setting(0.0, "Random 0..N seconds taken off the lifetime.",
                                      minimum=0, flags=("shoal worker --lifetime-stagger",))


@dataclass(frozen=True)
class ClientSettings:
    timeout: float = setting(10.0, "Seconds a client waits to connect to the scheduler.",
                             minimum=0, exclusive_minimum=True, flags=("Client(timeout=)",))


@dataclass(frozen=True)
class SecuritySettings:
    token: str | None = setting(
        None, "Shared secret every client and worker presents ('auto' on the scheduler"
        " generates one into token_file).", aliases=("SHOAL_TOKEN",), secret=True,
        flags=("shoal scheduler/worker --token", "Client(token=)"))
    token_file: str | None = setting(None, "File holding the token (written by --token auto).",
                                     flags=("shoal scheduler/worker --token-file",))
    insecure: bool = setting(False, "Allow listening beyond loopback with neither TLS nor a"
                             " token.", flags=("shoal scheduler/worker --insecure",))
    max_frame_bytes: str = setting(
        "", "Largest frame each authenticated role may send, e.g. client=64MiB,worker=256MiB.",
        flags=("shoal scheduler/worker --max-frame-bytes",))


@dataclass(frozen=True)
class TLSSettings:
    ca_file: str | None = setting(None, "The cluster CA's certificate (PEM): TLS on.",
                                  aliases=("SHOAL_TLS_CA_FILE",),
                                  flags=("shoal scheduler/worker --tls-ca-file",))
    cert: str | None = setting(None, "This process's certificate (PEM, of its role).",
                               aliases=("SHOAL_TLS_CERT",),
                               flags=("shoal scheduler/worker --tls-cert",))
    key: str | None = setting(None, "The private key of the certificate.",
                              aliases=("SHOAL_TLS_KEY",),
                              flags=("shoal scheduler/worker --tls-key",))


@dataclass(frozen=True)
class CommSettings:
    connect_timeout: float = setting(
        10.0, "Seconds a worker waits for the scheduler before giving up.", minimum=0,
        exclusive_minimum=True,
        flags=("shoal worker --connect-timeout", "Worker(connect_timeout=)"))
    heartbeat_interval: float = setting(
        0.5, "Seconds between a worker's heartbeats to the scheduler.", minimum=0,
        exclusive_minimum=True,
        flags=("shoal worker --heartbeat-interval", "Worker(heartbeat_interval=)"))
    max_frame_bytes: int | None = setting(
        None, "Largest frame after the handshake, in bytes (none: 8 GiB); read by the"
        " protocol layer itself.", aliases=("SHOAL_MAX_FRAME_BYTES",), minimum=1)
    shared_memory: bool = setting(
        True, "Between processes of one host, send values with 1 MiB or more of buffers"
        " through shared memory instead of the socket (docs/shared-memory.md).")


@dataclass(frozen=True)
class LoggingSettings:
    level: str | None = setting(
        None, "Level of shoal's loggers (none: the servers started by the CLI log at info,"
        " an embedded cluster leaves logging as the application set it).",
        choices=LOG_LEVELS, aliases=("SHOAL_LOG_LEVEL",),
        flags=("shoal scheduler/worker --log-level",))


@dataclass(frozen=True)
class DashboardSettings:
    enabled: bool = setting(True, "Serve the dashboard (scheduler) and /metrics (worker).",
                            flags=("shoal scheduler/worker --dashboard/--no-dashboard",))
    scheduler_address: str = setting(
        ":8787", "[HOST]:PORT of the scheduler's dashboard, JSON API and /metrics.",
        flags=("shoal scheduler --dashboard-address",))
    worker_address: str = setting(":0", "[HOST]:PORT of each worker's /metrics and /health.",
                                  flags=("shoal worker --dashboard-address",))


#: section name -> its schema, in the order ``shoal config show`` prints them
SECTIONS: dict[str, type[Any]] = {
    "scheduler": SchedulerSettings, "worker": WorkerSettings, "client": ClientSettings,
    "security": SecuritySettings, "tls": TLSSettings, "comm": CommSettings,
    "logging": LoggingSettings, "dashboard": DashboardSettings,
}  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """One key of the schema, e.g. ``scheduler.port``."""

    section: str
    name: str
    #: int, float, str or bool
    type: type[Any]
    #: None is allowed (and is the "unset" value)
    optional: bool
    default: Any
    meta: Meta

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}__{self.name.upper()}"

    def allowed(self) -> str:
        """What values are allowed, in words."""
        if self.meta.choices:
            what = "one of " + ", ".join(self.meta.choices)
        else:
            what = {int: "an integer", float: "a number", bool: "true or false",
                    str: "a string"}[self.type]  # fmt: skip
            low, high = self.meta.minimum, self.meta.maximum
            if low is not None and high is not None:
                what += f" from {low:g} to {high:g}"
            elif low is not None:
                what += f" {'>' if self.meta.exclusive_minimum else '>='} {low:g}"
        return what + (" (or unset)" if self.optional else "")

    def check(self, value: Any, source: str) -> Any:
        """``value`` as this setting's type; ConfigError naming key, source and what is allowed."""
        if value is None and self.optional:
            return None
        converted = _convert(value, self.type)
        if converted is _INVALID:
            raise self.error(value, source)
        if self.meta.choices and str(converted).lower() not in self.meta.choices:
            raise self.error(value, source)
        if self.meta.choices:
            converted = str(converted).lower()
        if self.meta.form is not None:
            try:
                self.meta.form(converted)
            except ValueError as exc:
                raise ConfigError(f"{self.key} = {value!r} from {source}: {exc}") from None
        low, high = self.meta.minimum, self.meta.maximum
        if low is not None and (converted < low or self.meta.exclusive_minimum and converted == low):
            raise self.error(value, source)
        if high is not None and converted > high:
            raise self.error(value, source)
        return converted

    def error(self, value: Any, source: str) -> ConfigError:
        return ConfigError(f"{self.key} = {value!r} from {source}: expected {self.allowed()}")


_INVALID = object()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, kind: type[Any]) -> Any:
    """A TOML value or an environment string as ``kind``; `_INVALID` when it is not one."""
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            return True if text in _TRUE else False if text in _FALSE else _INVALID
        try:
            return kind(text)
        except ValueError:
            return _INVALID
    if kind is bool:
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool):  # TOML true is not 1
        return _INVALID
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else _INVALID


def _settings() -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for section, schema in SECTIONS.items():
        hints = get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind, optional = hints[f.name], False
            if get_origin(kind) in (Union, type(int | None)):
                optional = type(None) in get_args(kind)
                kind = next(a for a in get_args(kind) if a is not type(None))
            item = Setting(section, f.name, kind, optional, f.default, f.metadata["shoal"])
            out[item.key] = item
    return out


#: every key of the schema, ``"section.name"`` -> its `Setting`
SETTINGS: dict[str, Setting] = _settings()
_BY_ENV = {s.env_var: s for s in SETTINGS.values()}
_BY_ALIAS = {alias: s for s in SETTINGS.values() for alias in s.meta.aliases}


def _unknown(name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown setting {name} in {where}{hint}")


# ---------------------------------------------------------------- the effective values

class Config:
    """The effective settings: typed sections (``config.scheduler.port``) and, for each key,
    where its value came from (``config.source("scheduler.port")``). Immutable."""

    scheduler: SchedulerSettings
    worker: WorkerSettings
    client: ClientSettings
    security: SecuritySettings
    tls: TLSSettings
    comm: CommSettings
    logging: LoggingSettings
    dashboard: DashboardSettings

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str],
                 file: Path | None) -> None:  # fmt: skip
        #: the TOML file that was read (None: none)
        self.file = file
        self._values = dict(values)
        self._sources = dict(sources)
        for section, schema in SECTIONS.items():
            fields = {s.name: values[s.key] for s in SETTINGS.values() if s.section == section}
            object.__setattr__(self, section, schema(**fields))

    def get(self, key: str) -> Any:
        if key not in SETTINGS:
            raise _unknown(key, list(SETTINGS), "the schema")
        return self._values[key]

    def source(self, key: str) -> str:
        """``default``, ``file PATH``, ``env NAME``, or the flag or keyword that set it."""
        self.get(key)
        return self._sources[key]

    def override(self, values: Mapping[str, Any], source: str) -> Config:
        """A copy with ``values`` (key -> value; None means "not given") set from ``source``,
        e.g. ``config.override({"client.timeout": 5}, "keyword Client(timeout=)")``."""
        new_values, new_sources = dict(self._values), dict(self._sources)
        for key, value in values.items():
            if value is None:
                continue
            item = SETTINGS.get(key)
            if item is None:
                raise _unknown(key, list(SETTINGS), source)
            new_values[key] = item.check(value, source)
            new_sources[key] = source
        return Config(new_values, new_sources, self.file)

    def rows(self, reveal: bool = False) -> list[tuple[str, Any, str]]:
        """``(key, value, source)`` for every key; secrets masked unless ``reveal``."""
        return [(key, "***" if s.meta.secret and self._values[key] is not None and not reveal
                 else self._values[key], self._sources[key]) for key, s in SETTINGS.items()]

    def __repr__(self) -> str:
        changed = [f"{k}={v!r}" for k, v, src in self.rows() if src != "default"]
        return f"<Config {' '.join(changed) or 'defaults'}>"


def config_path(environ: Mapping[str, str] | None = None) -> tuple[Path | None, str]:
    """The TOML file to read and why: ``SHOAL_CONFIG`` (must exist), else the user's
    ``shoal.toml`` if it exists, else None."""
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        return Path(named).expanduser(), f"env {CONFIG_ENV}"
    base = env.get("XDG_CONFIG_HOME", "").strip()
    root = Path(base) if base and os.path.isabs(base) else Path(
        env.get("HOME") or Path.home()) / ".config"  # fmt: skip
    user_file = root / "shoal" / "shoal.toml"
    return (user_file, "the user config directory") if user_file.is_file() else (None, "")


def _read_file(path: Path, why: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (named by {why}) does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    out: dict[str, Any] = {}
    where = f"file {path}"
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown(f"[{section}]", [f"[{s}]" for s in SECTIONS], where)
        if not isinstance(table, dict):
            raise ConfigError(f"{section} in {where} must be a table ([{section}])")
        for name, value in table.items():
            key = f"{section}.{name}"
            if key not in SETTINGS:
                raise _unknown(key, list(SETTINGS), where)
            out[key] = value
    return out


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """The defaults, overridden by the TOML file, overridden by the environment (``environ``,
    by default ``os.environ``). Read anew at each call: cheap, and never stale."""
    env = os.environ if environ is None else environ
    values = {key: s.default for key, s in SETTINGS.items()}
    sources = dict.fromkeys(SETTINGS, "default")
    path, why = config_path(env)
    if path is not None:
        for key, value in _read_file(path, why).items():
            values[key] = SETTINGS[key].check(value, f"file {path}")
            sources[key] = f"file {path}"
    # Aliases first, so the new SHOAL_SECTION__KEY name wins when both are set.
    for alias, item in _BY_ALIAS.items():
        if alias in env:
            _set_from_env(item, env[alias], f"env {alias}", values, sources)
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        named = _BY_ENV.get(name)
        if named is None:
            raise _unknown(name, list(_BY_ENV), "the environment")
        _set_from_env(named, text, f"env {name}", values, sources)
    return Config(values, sources, path)


def _set_from_env(item: Setting, text: str, source: str, values: dict[str, Any],
                  sources: dict[str, str]) -> None:  # fmt: skip
    text = text.strip()
    if not text and item.optional:  # an empty variable unsets it (SHOAL_TOKEN= as before)
        values[item.key] = None
    elif not text and item.type is not str:
        raise item.error(text, source)
    else:
        values[item.key] = item.check(text, source)
    sources[item.key] = source


def reference_table() -> str:
    """Markdown: every key with its environment variable(s), flags, default and meaning
    (docs/configuration.md embeds it; a test checks it is current)."""
    lines = ["| key | environment | flags and keywords | default | meaning |",
             "|---|---|---|---|---|"]
    for key, s in SETTINGS.items():
        env = "<br>".join(f"`{name}`" for name in (s.env_var, *s.meta.aliases))
        flags = "<br>".join(f"`{flag}`" for flag in s.meta.flags) or "-"
        default = "unset" if s.default is None else f"`{_toml(s.default)}`"
        lines.append(f"| `{key}` | {env} | {flags} | {default} | {s.meta.help}"
                     f" Allowed: {s.allowed()}. |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else repr(value)


if __name__ == "__main__":  # python -m shoal.config --markdown: the table of docs/configuration.md
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m shoal.config --markdown")
    sys.stdout.write(reference_table())
