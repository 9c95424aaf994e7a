import pytest

from healthcheck.errors import ConfigError, InvalidInput
from healthcheck.matching import NamePattern, name_timestamp, validate_app_code
from healthcheck.models import Container


def container(name):
    return Container("ab" * 32, name, (name,), "img", "sleep", 0, "running", "Up 1 second", "none", ())


@pytest.mark.parametrize("app", ["bk_iam", "a", "A1", "bk-app.v2", "x" * 64, "9lives"])
def test_valid_app_codes(app):
    assert validate_app_code(app) == app


@pytest.mark.parametrize("app", ["", "bk_(iam", ".*", "_x", "-x", ".x", "x" * 65, "a/b", "a b", "a\x00",
                                 "\u4f60\u597d", "../etc", "a;rm", "$(id)", "a\n", "%2F"])
def test_invalid_app_codes(app):
    with pytest.raises(InvalidInput):
        validate_app_code(app)


@pytest.mark.parametrize("name,matches", [
    ("bk_iam-1709878117", True),
    ("bk_iam1709878117", True),          # Java SaaS: no dash
    ("bk_iam_v2-1700000000", False),
    ("xbk_iam-1700000000", False),
    ("bk_iam2-1700000000", False),
    ("bk_iam-170000000", False),         # 9 digits
    ("bk_iam-17000000000", False),       # 11 digits
    ("bk_iam", False),
    ("bk_iam-1700000000-old", False),
    ("bk_iamX1700000000", False),
])
def test_default_pattern_matches_exactly(name, matches):
    assert bool(NamePattern().select([container(name)], "bk_iam")) is matches


def test_app_code_is_data_not_regex():
    pattern = NamePattern()
    assert pattern.select([container("bkXiam-1700000000")], "bk.iam") == []
    assert pattern.select([container("bk.iam-1700000000")], "bk.iam")


def test_custom_pattern():
    pattern = NamePattern("app_{app}_[0-9]+")
    assert pattern.select([container("app_web_3")], "web")
    assert not pattern.select([container("web-1700000000")], "web")


@pytest.mark.parametrize("template", ["no-app-here", "{app}{app}", "{app}-(", "{app}["])
def test_bad_patterns_are_config_errors(template):
    with pytest.raises(ConfigError):
        NamePattern(template)


@pytest.mark.parametrize("name,app", [
    ("bk_iam-1709878117", "bk_iam"),
    ("bk_iam1709878117", "bk_iam"),
    ("bk_iam_v2-1700000000", "bk_iam_v2"),
    ("bk-app-1700000000", "bk-app"),
    ("random_name", None),
    ("_x-1700000000", None),
])
def test_app_recovered_from_name(name, app):
    assert NamePattern().app_of(name) == app


def test_name_timestamp():
    assert name_timestamp("bk_iam-1709878117") == 1709878117
    assert name_timestamp("nodigits") == 0
