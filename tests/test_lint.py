"""The linters make test runs, at zero warnings: flake8 on the Python (.flake8) and luacheck on
the entry Lua and its Lua tests (.luacheckrc)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT


def _python_scripts():
    scripts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "scripts", "*"))):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                if handle.readline().startswith(b"#!/usr/bin/env python3"):
                    scripts.append(path)
    return scripts


def test_flake8_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "flake8", "healthcheck", "tests"] + _python_scripts(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "", done.stdout


def test_luacheck_finds_nothing():
    if not shutil.which("luacheck"):
        if os.environ.get("CI"):
            pytest.fail("luacheck missing (scripts/install-deps installs Debian's lua-check)")
        pytest.skip("luacheck missing")
    done = subprocess.run(["luacheck", "--formatter", "plain", "scripts/nginx", "tests/lua"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "", done.stdout


def test_the_linters_can_fail(tmp_path):
    """Both see a planted fault: an unused import, an undefined global."""
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("import os\n")
    done = subprocess.run([sys.executable, "-m", "flake8", str(bad_py)], stdout=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert "F401" in done.stdout
    if shutil.which("luacheck"):
        bad_lua = tmp_path / "bad.lua"
        bad_lua.write_text("local x = 1\nreturn y\n")
        done = subprocess.run(["luacheck", "--formatter", "plain", "--std", "ngx_lua", str(bad_lua)],
                              stdout=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert "accessing undefined variable 'y'" in done.stdout and "unused variable 'x'" in done.stdout
