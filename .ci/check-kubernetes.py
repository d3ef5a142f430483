#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster.

Renders deploy/kubernetes/base and every overlay with `kubectl kustomize`,
then checks every object:
- built-in kinds against the Kubernetes 1.30 schemas (kubernetes-validate,
  strict: unknown fields are errors);
- RabbitmqCluster against the RabbitMQ Cluster Operator's CRD schema
  (deploy/kubernetes/crds, strict the same way);
- what the product needs: each service's outbox relay is a native sidecar
  of the service's pod on the service's database, readiness uses gRPC
  health and liveness the health name `liveness`, every container has a
  liveness probe, pods run as a numeric non-root user,
  every Deployment has a Service and a PodDisruptionBudget, the broker URL
  names every RabbitMQ node, and every Secret an overlay uses exists in it
  or is the operator's.
Then it shows that the checks can fail: the same manifests must be refused
by the Kubernetes 1.27 schemas (no native sidecars yet), a RabbitmqCluster
with a misspelt field by the CRD schema, and a pod without a numeric user
by the product checks.
"""

import copy
import glob
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

VERSION = "1.30.0"
ROOT = "deploy/kubernetes"
OPERATOR_SECRET = "shop-rabbitmq-default-user"

errors = []


def render(path):
    text = subprocess.check_output(["kubectl", "kustomize", path], text=True)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def strict(schema):
    """The CRD's OpenAPI schema as JSON Schema that refuses unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        preserve = node.pop("x-kubernetes-preserve-unknown-fields", False)
        if "properties" in node and not preserve and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


def crd_schemas():
    schemas = {}
    for path in glob.glob(f"{ROOT}/crds/*.yaml"):
        crd = yaml.safe_load(open(path))
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def validate(docs, version, schemas):
    """Schema errors of `docs`, as strings."""
    found = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in schemas:
            for error in jsonschema.Draft7Validator(schemas[key]).iter_errors(doc):
                path = ".".join(str(p) for p in error.absolute_path)
                found.append(f"{what}: {path}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"{what}: no schema for {key} in Kubernetes {version} or the CRDs")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            found.append(f"{what}: {path}: {error.message}")
    return found


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_product(name, docs, secrets_provided):
    """What the product needs of `docs`, as a list of errors."""
    found = []
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    secrets = {doc["metadata"]["name"] for doc in by_kind.get("Secret", [])}
    clusters = by_kind.get("RabbitmqCluster", [])
    if len(clusters) != 1:
        found.append(f"{name}: {len(clusters)} RabbitmqCluster objects, expected 1")
        return found
    cluster = clusters[0]
    replicas = cluster["spec"].get("replicas", 1)
    if replicas < 3:
        found.append(f"{name}: the RabbitMQ cluster has {replicas} nodes; quorum needs 3")
    nodes = {
        f"{cluster['metadata']['name']}-server-{i}.{cluster['metadata']['name']}-nodes"
        for i in range(replicas)
    }

    def selects(selector, labels):
        return all(labels.get(k) == v for k, v in selector.items())

    for deployment in by_kind.get("Deployment", []):
        dname = deployment["metadata"]["name"]
        where = f"{name}: Deployment {dname}"
        pod = deployment["spec"]["template"]
        labels = pod["metadata"]["labels"]
        if not any(
            selects(s["spec"].get("selector", {}), labels) for s in by_kind.get("Service", [])
        ):
            found.append(f"{where}: no Service selects its pods")
        if not any(
            selects(p["spec"]["selector"]["matchLabels"], labels)
            for p in by_kind.get("PodDisruptionBudget", [])
        ):
            found.append(f"{where}: no PodDisruptionBudget covers its pods")
        spec = pod["spec"]
        containers = spec["containers"]
        for container in containers + spec.get("initContainers", []):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                known = ref and (ref["name"] in secrets or ref["name"] == OPERATOR_SECRET)
                if ref and secrets_provided and not known:
                    found.append(f"{where}: uses Secret {ref['name']}, which nothing provides")
            url = env_of(container).get("AMQP_URL", {}).get("value")
            if url is not None:
                hosts = {part.split("@", 1)[1].split(":", 1)[0] for part in url.split(",")}
                if hosts != nodes:
                    found.append(f"{where}: AMQP_URL names {sorted(hosts)}, not {sorted(nodes)}")
        context = spec.get("securityContext", {})
        user = context.get("runAsUser")
        if context.get("runAsNonRoot") is not True:
            found.append(f"{where}: the pod does not set runAsNonRoot")
        if isinstance(user, bool) or not isinstance(user, int) or user <= 0:
            found.append(f"{where}: runAsNonRoot needs a numeric non-root runAsUser, not {user!r}")
        for container in containers + spec.get("initContainers", []):
            own = container.get("securityContext", {})
            if own.get("runAsUser") == 0 or own.get("runAsNonRoot") is False:
                found.append(f"{where}: container {container['name']} runs as root")
            if "livenessProbe" not in container:
                found.append(f"{where}: container {container['name']} has no liveness probe")
        if dname == "gateway":
            continue
        service = containers[0]
        for probe in ("startupProbe", "readinessProbe"):
            if "grpc" not in service.get(probe, {}):
                found.append(f"{where}: {probe} is not a gRPC health check")
        if service.get("livenessProbe", {}).get("grpc", {}).get("service") != "liveness":
            found.append(f"{where}: liveness does not ask the health name liveness")
        relays = [c for c in spec.get("initContainers", []) if c.get("command") == ["outbox-relay"]]
        if len(relays) != 1:
            found.append(f"{where}: {len(relays)} outbox-relay sidecars, expected 1")
            continue
        relay = relays[0]
        if relay.get("restartPolicy") != "Always":
            found.append(f"{where}: the relay is not a native sidecar (restartPolicy Always)")
        if env_of(relay).get("DATABASE_URL") != env_of(service).get("DATABASE_URL"):
            found.append(f"{where}: the relay does not read the service's database")
        source = env_of(relay).get("OUTBOX_RELAY_SOURCE", {}).get("value")
        if source != f"{dname}-service":
            found.append(f"{where}: the relay's source is {source}, not {dname}-service")
        if relay.get("livenessProbe", {}).get("grpc", {}).get("service") != "liveness":
            found.append(f"{where}: the relay's liveness does not ask the health name liveness")
    return found


def main():
    os.chdir(os.path.join(os.path.dirname(__file__), ".."))
    schemas = crd_schemas()
    targets = [f"{ROOT}/base"] + sorted(glob.glob(f"{ROOT}/overlays/*"))
    for target in targets:
        docs = render(target)
        for error in validate(docs, VERSION, schemas):
            errors.append(f"{target}: {error}")
        # The base leaves the Secrets to its overlays.
        errors.extend(check_product(target, docs, secrets_provided=target != f"{ROOT}/base"))
        print(f"kubernetes: {target}: {len(docs)} objects checked")

    # Controls: the checks above can fail.
    docs = render(targets[-1])
    older = [e for e in validate(docs, "1.27.0", schemas) if "restartPolicy" in e]
    if not older:
        errors.append("control: the Kubernetes 1.27 schemas accept native sidecars")
    else:
        print(f"kubernetes: 1.27 refuses native sidecars ({len(older)} pods)")
    broken = copy.deepcopy(docs)
    for doc in broken:
        if doc["kind"] == "RabbitmqCluster":
            doc["spec"]["replica"] = doc["spec"].pop("replicas")
    refused = [e for e in validate(broken, VERSION, schemas) if "replica" in e]
    rooted = copy.deepcopy(docs)
    for doc in rooted:
        if doc["kind"] == "Deployment":
            doc["spec"]["template"]["spec"]["securityContext"].pop("runAsUser", None)
    if not any("runAsUser" in e for e in check_product("control", rooted, True)):
        errors.append("control: a pod without runAsUser passes the product checks")
    else:
        print("kubernetes: a pod without a numeric user is refused")
    if not refused:
        errors.append("control: the CRD schema accepts RabbitmqCluster spec.replica")
    else:
        print("kubernetes: the CRD schema refuses a misspelt RabbitmqCluster field")

    for error in errors:
        print(f"kubernetes: {error}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
