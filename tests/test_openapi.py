"""The OpenAPI document: valid, in step with the routes, and upheld by schemathesis live."""
import os
import re
import subprocess
import sys

from openapi_spec_validator import validate

from healthcheck.web import load_openapi, make_app
from support import Service, name_for, unique_app, wait_for


def test_document_is_valid_openapi_3():
    document = load_openapi("/container-healthcheck")
    validate(document)
    assert document["openapi"].startswith("3.0")
    assert document["servers"] == [{"url": "/container-healthcheck"}]


def test_routes_and_document_describe_the_same_operations():
    prefix = "/container-healthcheck"
    app = make_app(checker=None, metrics=None, prefix=prefix)
    routes = set()
    for route in app.routes:
        path = re.sub(r"<([a-z_]+)>", r"{\1}", route.rule[len(prefix):])
        if path == "":
            path = "/"  # the host page is served at the prefix with or without its slash
        elif path.endswith("/") and path != "/":
            path = path[:-1]  # the trailing-slash twin of a route: documented once, in info
        routes.add((path, route.method.lower()))
        if route.method == "GET":
            routes.add((path, "head"))  # Bottle answers HEAD from GET routes
    documented = {(path, method) for path, item in load_openapi(prefix)["paths"].items() for method in item}
    assert routes == documented


def test_envelope_codes_are_documented():
    document = load_openapi("/x")
    codes = set(document["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    from healthcheck import errors
    assert codes == {errors.CODE_DOCKER_UNREACHABLE, errors.CODE_DOCKER_FAILED, errors.CODE_INVALID_INPUT,
                     errors.CODE_NO_ROUTE, errors.CODE_FORBIDDEN, errors.CODE_INTERNAL}


def test_schemathesis_against_the_live_service(docker_engine, docker, tmp_path):
    running, exited, paused = unique_app("st"), unique_app("st"), unique_app("st")
    docker.run(name_for(running), "--health-cmd", "true", "--health-interval", "1s")
    docker.run(name_for(exited), cmd=("true",))
    docker.run(name_for(paused))
    docker("pause", name_for(paused))
    wait_for(lambda: docker.health(name_for(running)) == "healthy", 20)
    examples = os.environ.get("SCHEMATHESIS_EXAMPLES", "100")
    with Service("--ngx-port", "0") as svc:
        url = "http://127.0.0.1:%d/container-healthcheck/openapi.json" % svc.port
        # not_a_server_error flags every 5xx, documented or not; status_code_conformance
        # holds the documented 503s to the document instead.
        proc = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", url,
             "--checks", "all", "--exclude-checks", "not_a_server_error",
             "--max-examples", examples, "--seed", "20261129", "--generation-database", "none",
             "--request-timeout", "10", "--no-color", "--report", "junit",
             "--report-junit-path", str(tmp_path / "junit.xml")],
            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
            timeout=600)
        ours = svc.get("/apps/health/" + running)
    summary = proc.stdout[proc.stdout.find("SUMMARY"):] if "SUMMARY" in proc.stdout else proc.stdout[-3000:]
    print(summary)
    assert proc.returncode == 0, proc.stdout[-6000:]
    tested = re.search(r"Tested: (\d+)", proc.stdout)
    assert tested and int(tested.group(1)) >= 9, proc.stdout[-3000:]
    assert ours[0] == 200


def test_every_status_the_issue_names_is_documented():
    statuses = set()
    for item in load_openapi("/x")["paths"].values():
        for op in item.values():
            statuses.update(op["responses"])
    assert {"200", "400", "404", "405", "503"} <= statuses
