"""A service's /apps answer read back into HealthReports (pure): what `apps` prints from a
running service, the same model `apps --direct` prints from its own checks."""
from healthcheck import errors
from healthcheck.models import HealthReport


def reports_from_apps_answer(answer):
    """The HealthReports in a /apps answer (a service's JSON, decoded), in its order.
    :raises ValueError: answer is not a /apps answer."""
    if not isinstance(answer, dict) or answer.get("code") != errors.CODE_OK:
        raise ValueError("not a /apps answer")
    message = answer.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("apps"), dict):
        raise ValueError("not a /apps answer")
    shorts = message.get("unhealthy") if isinstance(message.get("unhealthy"), dict) else {}
    return [HealthReport.from_envelope(app, envelope, str(shorts.get(app, "")))
            for app, envelope in message["apps"].items()]
