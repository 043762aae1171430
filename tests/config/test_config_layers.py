"""shoal.config: defaults < shoal.toml < SHOAL_* environment < flags and keywords, each value
with its source; bad values and unknown keys named with their source and what is allowed.
Pure: no processes (those are in test_config_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.config import SETTINGS, ConfigError, config_path, load_config, reference_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def write(tmp_path: Path, text: str) -> dict[str, str]:
    """A config file with ``text``, and an environment naming it (and nothing else)."""
    path = tmp_path / "shoal.toml"
    path.write_text(text)
    return {"SHOAL_CONFIG": str(path), "HOME": str(tmp_path)}


def test_defaults_without_any_file(tmp_path: Path) -> None:
    # given a home with no config directory and no variables
    config = load_config({"HOME": str(tmp_path)})
    # then every value is the schema's default, and says so
    assert config.file is None
    assert config.scheduler.port == 8786 and config.worker.nthreads == 1
    assert all(source == "default" for _, _, source in config.rows())


def test_file_then_env_then_keyword(tmp_path: Path) -> None:
    env = write(tmp_path, "[scheduler]\nport = 9100\nworker_ttl = 12\n"
                          "[worker]\nnthreads = 2\n[client]\ntimeout = 4.5\n")
    env["SHOAL_WORKER__NTHREADS"] = "5"
    config = load_config(env)
    # the file sets what the environment does not; the environment beats the file
    assert config.scheduler.port == 9100
    assert config.source("scheduler.port") == f"file {tmp_path / 'shoal.toml'}"
    assert config.scheduler.worker_ttl == 12.0 and isinstance(config.scheduler.worker_ttl, float)
    assert config.worker.nthreads == 5
    assert config.source("worker.nthreads") == "env SHOAL_WORKER__NTHREADS"
    # and a keyword beats both
    mine = config.override({"worker.nthreads": 7, "client.timeout": None}, "keyword X(n=)")
    assert mine.worker.nthreads == 7 and mine.source("worker.nthreads") == "keyword X(n=)"
    assert mine.client.timeout == 4.5  # None means "not given"
    assert config.worker.nthreads == 5  # the original is unchanged


def test_old_variable_names_are_aliases_and_the_new_name_wins(tmp_path: Path) -> None:
    env = write(tmp_path, "[security]\ntoken = 'from-file'\n")
    env.update(SHOAL_TOKEN="old", SHOAL_TLS_CERT="/c.pem", SHOAL_LOG_LEVEL="DEBUG")
    config = load_config(env)
    assert config.security.token == "old" and config.source("security.token") == "env SHOAL_TOKEN"
    assert config.tls.cert == "/c.pem" and config.logging.level == "debug"
    env["SHOAL_SECURITY__TOKEN"] = "new"
    config = load_config(env)
    assert config.security.token == "new"
    assert config.source("security.token") == "env SHOAL_SECURITY__TOKEN"
    # an empty variable unsets an optional value, as SHOAL_TOKEN= always did
    assert load_config({**env, "SHOAL_SECURITY__TOKEN": ""}).security.token is None


def test_user_config_directory(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg" / "shoal"
    xdg.mkdir(parents=True)
    (xdg / "shoal.toml").write_text("[worker]\nnthreads = 4\n")
    home_file = tmp_path / ".config" / "shoal" / "shoal.toml"
    home_file.parent.mkdir(parents=True)
    home_file.write_text("[worker]\nnthreads = 6\n")
    # XDG_CONFIG_HOME first, else ~/.config
    with_xdg = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert load_config(with_xdg).worker.nthreads == 4
    assert load_config({"HOME": str(tmp_path)}).worker.nthreads == 6
    assert config_path({"HOME": str(tmp_path)}) == (home_file, "the user config directory")
    # SHOAL_CONFIG beats both; naming a missing file is an error saying who named it
    with pytest.raises(ConfigError, match=r"nope.toml \(named by env SHOAL_CONFIG\) does not"):
        load_config({**with_xdg, "SHOAL_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(("toml", "env", "message"), [
    ("[scheduler]\nport = 'x'\n", {}, (r"scheduler.port = 'x' from file .*shoal.toml: expected"
                                      r" an integer from 0 to 65535")),
    ("[scheduler]\nport = 70000\n", {}, r"scheduler.port = 70000 from file"),
    ("[worker]\nnanny = 1\n", {}, r"worker.nanny = 1 from file .*: expected true or false"),
    ("", {"SHOAL_COMM__HEARTBEAT_INTERVAL": "0"},
     (r"comm.heartbeat_interval = '0' from env SHOAL_COMM__HEARTBEAT_INTERVAL: expected a"
     r" number > 0")),
    ("", {"SHOAL_LOG_LEVEL": "loud"}, (r"logging.level = 'loud' from env SHOAL_LOG_LEVEL:"
                                      r" expected one of debug, info")),
    ("", {"SHOAL_WORKER__NTHREADS": ""}, r"worker.nthreads = '' from env"),
    ("[worker]\nnthreds = 2\n", {},
     r"unknown setting worker.nthreds in file .*\(did you mean worker.nthreads\?\)"),
    ("[workers]\nnthreads = 2\n", {}, r"unknown setting \[workers\] .*did you mean \[worker\]"),
    ("", {"SHOAL_SCHEDULER__PROT": "1"},
     (r"unknown setting SHOAL_SCHEDULER__PROT in the environment \(did you mean"
     r" SHOAL_SCHEDULER__PORT\?\)")),
    ("[scheduler\n", {}, r"cannot read config file"),
    ("worker = 3\n", {}, r"worker in file .* must be a table"),
])
def test_bad_values_name_key_source_and_what_is_allowed(
        tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        load_config({**write(tmp_path, toml), **env})


def test_a_bad_keyword_names_its_source(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"client.timeout = -1 from keyword Client\(timeout=\)"):
        config.override({"client.timeout": -1}, "keyword Client(timeout=)")


def test_other_shoal_variables_are_not_settings(tmp_path: Path) -> None:
    # SHOAL_* variables without "__" belong to others (SHOAL_GC_STRESS, SHOAL_NETNS_BACKEND)
    env = {**write(tmp_path, ""), "SHOAL_GC_STRESS": "10", "SHOAL_NETNS_BACKEND": "x"}
    assert all(source == "default" for _, _, source in load_config(env).rows())


def test_the_token_is_masked() -> None:
    rows = {k: v for k, v, _ in load_config({"SHOAL_TOKEN": "s3cret"}).rows()}
    assert rows["security.token"] == "***"
    assert "s3cret" not in repr(load_config({"SHOAL_TOKEN": "s3cret"}))


def test_the_documentation_lists_every_key_as_the_schema_says() -> None:
    # docs/configuration.md embeds the generated table: it must be the current one
    text = DOC.read_text()
    assert reference_table() in text, "regenerate: python -m shoal.config --markdown"
    for key, item in SETTINGS.items():
        assert f"`{key}`" in text and item.env_var in text


def test_resources_are_checked_when_read(tmp_path: Path) -> None:
    env = {**write(tmp_path, "[worker]\nresources = 'GPU=2,MEM=1e9'\n")}
    assert load_config(env).worker.resources == "GPU=2,MEM=1e9"
    with pytest.raises(ConfigError, match=r"worker.resources = 'GPU' from env"
                                          r" SHOAL_WORKER__RESOURCES: 'GPU' is not NAME=AMOUNT"):
        load_config({**env, "SHOAL_WORKER__RESOURCES": "GPU"})
