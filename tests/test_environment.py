"""``FS_GMFL_*`` environment variables are validated like configuration keys (issue #28).

A bad value (huge, negative, NaN, non-numeric, empty, an unusable directory)
stops ``fs-gmfl run`` before anything starts: one stderr line naming the
variable, the value and what is allowed, exit code 2, no traceback, no output
directory.
"""

from __future__ import annotations

import pytest

from fs_gmfl.cli import main
from fs_gmfl.config.environment import CACHE, DATA, MEMORY_BYTES, THREADS, VARIABLES, check_environment
from fs_gmfl.errors import ConfigError, EnvironmentVariableError
from tests.conftest import TINY  # a valid run: only the environment stops it

NUMBERS = ["99999999999999999999", "-1", "nan", "abc", "", "  ", "0", "1.5", "\u00b2", "1e3"]
BAD_VALUES = ([(THREADS.name, v) for v in NUMBERS] + [(MEMORY_BYTES.name, v) for v in NUMBERS]
              + [(DATA.name, ""), (DATA.name, "/no/such/directory"), (CACHE.name, ""), (CACHE.name, "/dev/null")])


@pytest.mark.parametrize("variable, value", BAD_VALUES, ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_a_bad_variable_stops_the_run_in_one_line(variable, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(variable, value)
    out = tmp_path / "out"
    code = main(["run", "--cfg", "/dev/null", "--quiet", *TINY, "outdir", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"fs-gmfl: error: environment variable '{variable}' = {value!r} is not allowed: ")
    assert "unset for" in lines[0] and "Traceback" not in lines[0]
    assert not out.exists()


def test_federatedscope_commands_check_the_environment_first(capsys, monkeypatch):
    """``fs-run`` hands its arguments to FederatedScope, but a bad variable is refused before it is imported."""
    monkeypatch.setenv(THREADS.name, "99999999999999999999")
    assert main(["fs-run", "--cfg", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fs-gmfl: error: environment variable 'FS_GMFL_THREADS'")


def test_good_values_and_unset_variables_pass(tmp_path):
    environ = {THREADS.name: " 2 ", MEMORY_BYTES.name: "1024", DATA.name: str(tmp_path),
               CACHE.name: str(tmp_path / "created-later")}
    check_environment(environ)
    check_environment({})
    assert (THREADS.read(environ), MEMORY_BYTES.read(environ), DATA.read(environ)) == (2, 1024, tmp_path)
    assert all(variable.read({}) is None for variable in VARIABLES)


def test_the_error_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError) as info:
        THREADS.parse("4097")
    assert isinstance(info.value, EnvironmentVariableError) and info.value.key == "FS_GMFL_THREADS"
    assert "from 1 to 4096" in str(info.value)
