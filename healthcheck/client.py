"""Asking a running service from the command line (`container-healthcheck apps`): its /apps
answer's bytes, or why there are none. Never through a proxy."""
import json
import urllib.error
import urllib.request


def apps_answer(url, include_all, timeout_s):
    """(answer bytes or None, problem in words) from the service at url (its prefix included)."""
    target = url.rstrip("/") + "/apps" + ("?all=true" if include_all else "")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(target, headers={"Accept": "application/json"}),
                         timeout=timeout_s) as response:
            return response.read(), None
    except urllib.error.HTTPError as exc:
        try:
            return None, json.loads(exc.read().decode("utf-8")).get("message", str(exc))
        except (ValueError, AttributeError):
            return None, str(exc)
    except (OSError, ValueError) as exc:  # ValueError: a URL http.client cannot send
        return None, "cannot ask %s: %s" % (target, exc)
