"""Which containers belong to an app: app code validation and the name pattern (pure)."""
import re

from healthcheck import text
from healthcheck.bounded import BoundedCache
from healthcheck.errors import ConfigError, InvalidInput

# BlueKing names containers <app_code>-<unix time> (Python SaaS) or <app_code><unix time> (Java).
DEFAULT_NAME_PATTERN = "{app}-?[0-9]{10}"

APP_CODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# How /apps recovers app codes from names: {app} as a lazy group of app-code characters.
_APP_GROUP = "(?P<app>[A-Za-z0-9][A-Za-z0-9_.-]*?)"
_TRAILING_DIGITS_RE = re.compile(r"([0-9]+)$")
_COMPILED_PER_APP_MAX = 4096


def validate_app_code(app):
    """:raises InvalidInput: app is not a BlueKing app code, so it is never looked up."""
    if not isinstance(app, str) or not APP_CODE_RE.fullmatch(app):
        raise InvalidInput("invalid app_code %s: expected [A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
                           % text.quoted(app))
    return app


def check_name_template(template):
    """:raises ConfigError: template lacks exactly one {app} or is not a valid regex."""
    if template.count("{app}") != 1:
        raise ConfigError("--name-pattern must contain {app} exactly once: %r" % template)
    try:
        re.compile(template.replace("{app}", "x"))
    except re.error as exc:
        raise ConfigError("--name-pattern %r is not a valid regex: %s" % (template, exc))
    return template


class NamePattern(object):
    """A regex template, matched in full, where `{app}` stands for the escaped app code."""

    def __init__(self, template=DEFAULT_NAME_PATTERN):
        self.template = check_name_template(template)
        try:
            self._recover = re.compile(template.replace("{app}", _APP_GROUP))
        except re.error as exc:
            raise ConfigError("--name-pattern %r is not a valid regex: %s" % (template, exc))
        self._per_app = BoundedCache(_COMPILED_PER_APP_MAX)

    def for_app(self, app):
        """The compiled full-match regex for one app code (data, escaped: never a regex)."""
        compiled = self._per_app.get(app)
        if compiled is None:
            compiled = self._per_app.put(app, re.compile(self.template.replace("{app}", re.escape(app))))
        return compiled

    def select(self, containers, app):
        """The containers whose primary name fully matches the pattern for app."""
        compiled = self.for_app(app)
        return [c for c in containers if compiled.fullmatch(c.name)]

    def app_of(self, name):
        """The app code a container name belongs to, or None."""
        match = self._recover.fullmatch(name)
        if match and APP_CODE_RE.fullmatch(match.group("app")):
            return match.group("app")
        return None


def name_timestamp(name):
    """The Unix time BlueKing puts at the end of a name; 0 when there is none."""
    match = _TRAILING_DIGITS_RE.search(name)
    return int(match.group(1)) if match else 0
