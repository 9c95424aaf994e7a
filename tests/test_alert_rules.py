"""The shipped Prometheus alert rules: valid, and their promtool unit tests pass (each alert
fires when it should, with its summary, and stays quiet when it should not); every metric a
rule names is one the entry Lua or the service exports."""
import os
import re
import shutil
import subprocess

import pytest

from support import LUA_DIR, ROOT

RULES_DIR = os.path.join(ROOT, "scripts", "prometheus")
RULES = os.path.join(RULES_DIR, "container-healthcheck-rules.yml")


def _promtool():
    path = shutil.which("promtool")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("promtool missing (scripts/install-deps installs Debian's prometheus)")
        pytest.skip("promtool missing")
    return path


def _run(*args):
    return subprocess.run([_promtool()] + list(args), cwd=RULES_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)


def test_rules_are_valid():
    done = _run("check", "rules", RULES)
    assert done.returncode == 0, done.stdout
    assert "SUCCESS: 6 rules found" in done.stdout


def test_rules_unit_tests_pass():
    done = _run("test", "rules", "container-healthcheck-rules.test.yml")
    assert done.returncode == 0, done.stdout


def test_a_broken_rule_fails_its_unit_test(tmp_path):
    """The unit tests can fail: the same tests against rules whose threshold moved."""
    broken = open(RULES).read().replace("> 10", "> 100")
    shutil.copy(os.path.join(RULES_DIR, "container-healthcheck-rules.test.yml"), str(tmp_path))
    with open(os.path.join(str(tmp_path), "container-healthcheck-rules.yml"), "w") as handle:
        handle.write(broken)
    done = subprocess.run([_promtool(), "test", "rules", "container-healthcheck-rules.test.yml"], cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert done.returncode != 0 and "ContainerHealthcheckEjectionsClimbing" in done.stdout, done.stdout


def test_every_metric_a_rule_names_is_exported():
    lua = open(os.path.join(LUA_DIR, "container_healthcheck", "metrics.lua")).read()
    python = open(os.path.join(ROOT, "healthcheck", "metrics.py")).read()
    named = set(re.findall(r"\b((?:container_healthcheck|healthcheck)_[a-z_]+)", open(RULES).read()))
    for name in named:
        if name.startswith("container_healthcheck_"):
            short = name[len("container_healthcheck_"):]
            assert '"%s"' % short in lua, name  # a family name metrics.lua writes
        else:
            assert '"%s"' % name in python, name
