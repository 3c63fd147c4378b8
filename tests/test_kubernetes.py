"""deploy/kubernetes, checked offline.

Each kustomization is rendered (kustomize, or kubectl's built-in copy) and every object validated
against the Kubernetes OpenAPI schemas that kubernetes-validate bundles, strictly (an unknown or
misspelt field fails). Then what the objects say is held to what the server and the image do: the
container's command (the image's ENTRYPOINT plus `args`) parses with the server's own parser, the
probes and ports match it, the kubelet waits longer than the server drains, every file the server
is told about lies on a mounted volume, the HPA's metric is one the server exports, and the TLS
probe command passes against a mutual-TLS health server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trustme
import yaml
from dockerfile_stages import exec_form, read_stages
from tls_health import mtls_health_server, write_tls_files

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = {
    "gpu-tls": KUBERNETES,
    "gpu": KUBERNETES / "base",
    "cpu": KUBERNETES / "overlays" / "cpu",
}
# Native gRPC probes are GA from 1.27; the newest release kubernetes-validate knows is checked too.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def kustomize_command() -> list[str] | None:
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    return None


def render(directory: Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command is None:
        return list(raw_resources(directory))
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def raw_resources(directory: Path) -> list[dict[str, Any]]:
    """Without a kustomize binary: the files the resources lists name, untransformed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if kustomization.get("patches") or kustomization.get("components"):
        pytest.skip(f"{directory.relative_to(REPO)} has patches: rendering it needs kustomize or kubectl")
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += (
            raw_resources(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
        )
    return docs


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def objects(variant: str) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[variant])


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (main,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(main)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_validate_against_the_kubernetes_schemas(objects: list[dict[str, Any]], version: str) -> None:
    assert {o["kind"] for o in objects} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message} at {list(exc.path)}"
            )


def server_command(objects: list[dict[str, Any]]) -> list[str]:
    """What the container runs: its image's ENTRYPOINT (the Dockerfile target named by the tag), then args."""
    main = container(objects)
    name, _, tag = main["image"].rpartition(":")
    stages = read_stages()
    assert name == "textgen" and tag in ("cpu", "gpu"), (
        f"image {main['image']}: expected textgen:cpu or textgen:gpu"
    )
    assert "command" not in main, "the container keeps the image's ENTRYPOINT"
    return exec_form(stages[tag].values("ENTRYPOINT")[0]) + list(main.get("args", []))


def test_container_command_is_the_servers(objects: list[dict[str, Any]], tiny_model_dir: Path) -> None:
    from textgen_server.__main__ import parse_args

    command, *argv = server_command(objects)
    assert command == "textgen-server"
    settings = parse_args([str(tiny_model_dir) if a == "/model" else a for a in argv])
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(objects)

    # The kubelet's SIGKILL comes after the server's drain, with room for its stop and exit.
    assert settings.grace_seconds < pod["terminationGracePeriodSeconds"] <= settings.grace_seconds + 15

    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        handler = main[probe]
        if "grpc" in handler:
            assert handler["grpc"]["port"] == settings.port, probe
        else:
            target = next(a for a in handler["exec"]["command"] if a.startswith("--target="))
            assert target == f"--target=127.0.0.1:{settings.port}", probe
    # Loading Mistral-7B takes minutes: the startup probe allows at least ten before the kubelet restarts it.
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert main["readinessProbe"].get("grpc", {}).get("service", "textgen.v1.TextGeneration") == (
        "textgen.v1.TextGeneration"
    )

    # Every absolute path the server is given lies on a volume mounted into the container.
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = [re.sub(r"^--[\w-]+=", "", a) for a in argv if re.sub(r"^--[\w-]+=", "", a).startswith("/")]
    assert "/model" in paths
    for path in paths:
        mount = next((m for m in mounts if path == m or path.startswith(m + "/")), None)
        assert mount is not None, f"{path} is on no mounted volume"
        assert mounts[mount] in volumes
        if (secret := volumes[mounts[mount]].get("secret")) is not None:
            assert secret["secretName"].startswith("textgen-")
            assert main["volumeMounts"][list(mounts).index(mount)]["readOnly"] is True

    # The image's user, and a root filesystem the server never writes.
    (user,) = read_stages()[main["image"].rpartition(":")[2]].values("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert main["securityContext"]["readOnlyRootFilesystem"] is True


def test_selectors_and_references_agree(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance over the replicas themselves"
    assert selects(service["spec"]["selector"])
    container_ports = {p["name"] for p in container(objects)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert selects(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [one(objects, "PersistentVolumeClaim")["metadata"]["name"]]


def test_hpa_scales_on_the_queue_gauge_the_server_exports(objects: list[dict[str, Any]]) -> None:
    from textgen_server.metrics import Metrics

    exported = {family.name: family.type for family in Metrics().registry.collect()}
    (metric,) = one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert exported.get(name) == "gauge", f"{name} is not a gauge the server exports: {sorted(exported)}"
    assert "queue" in name


def test_tls_probe_commands_pass_against_a_mutual_tls_server(tmp_path: Path) -> None:
    """The probes of the TLS variant, run as written but for the files' directory and the port."""
    from textgen_server.healthcheck import main as healthcheck

    objects = render(KUSTOMIZATIONS["gpu-tls"])
    main = container(objects)
    (tls_mount,) = [m["mountPath"] for m in main["volumeMounts"] if m["name"] == "tls"]
    # The pod's certificate: the Service's DNS name and localhost, the name the in-pod probe checks.
    files = write_tls_files(trustme.CA(), tmp_path / "tls", "textgen.default.svc", "localhost")
    server_args = [a for a in main["args"] if a.startswith("--tls-")]
    assert {a.split("=", 1)[1] for a in server_args} == {f"{tls_mount}/{f.name}" for f in files.values()}
    with mtls_health_server(files) as target:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command, *args = main[probe]["exec"]["command"]
            assert command == "textgen-healthcheck"
            args = [a.replace(tls_mount, str(tmp_path / "tls")) for a in args]
            args = [f"--target={target}" if a.startswith("--target=") else a for a in args]
            assert healthcheck(args) == 0, probe
