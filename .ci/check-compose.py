#!/usr/bin/env python3
"""Checks docker-compose.yml and the Dockerfile as far as possible without a
Docker engine: every container is health-checked, starts after what it needs,
runs a binary the workspace builds and the image contains, and uses a
database the PostgreSQL init script creates."""

import json
import re
import subprocess
import sys

import yaml

errors = []
compose = yaml.safe_load(open("docker-compose.yml"))
dockerfile = open("Dockerfile").read()
services = compose["services"]

metadata = json.loads(
    subprocess.check_output(["cargo", "metadata", "--no-deps", "--format-version", "1", "--locked"])
)
binaries = {
    target["name"]
    for package in metadata["packages"]
    for target in package["targets"]
    if "bin" in target["kind"]
}

init_sql = compose["configs"]["postgres-init"]["content"]
databases = set(re.findall(r'CREATE DATABASE "?(\w+)"?', init_sql))

for name, service in services.items():
    if "healthcheck" not in service:
        errors.append(f"{name}: no healthcheck")
    for dependency, condition in (service.get("depends_on") or {}).items():
        if dependency not in services:
            errors.append(f"{name}: depends on unknown service {dependency}")
        elif condition.get("condition") != "service_healthy":
            errors.append(f"{name}: should wait for {dependency} to be healthy")
    command = service.get("command")
    if command:
        binary = command[0]
        if binary not in binaries:
            errors.append(f"{name}: runs {binary}, which the workspace does not build")
        if f"target/release/{binary}" not in dockerfile:
            errors.append(f"{name}: runs {binary}, which the Dockerfile does not copy")
    health = service.get("healthcheck", {}).get("test", [])
    if "shop-healthcheck" in health and "target/release/shop-healthcheck" not in dockerfile:
        errors.append(f"{name}: health check binary missing from the image")
    url = (service.get("environment") or {}).get("DATABASE_URL")
    if url:
        database = url.rsplit("/", 1)[-1]
        if database not in databases:
            errors.append(f"{name}: database {database} is not created by postgres-init")
        if not command:
            errors.append(f"{name}: uses a database but runs no command of ours")

# The cluster profile: the RabbitMQ nodes form one cluster, and every
# service and relay lists every node.
nodes = {
    name: service
    for name, service in services.items()
    if str(service.get("image", "")).startswith("rabbitmq:")
}
peers = compose["configs"].get("rabbitmq-cluster", {}).get("content", "")
listed = set(re.findall(r"classic_config\.nodes\.\d+ = rabbit@([\w-]+)", peers))
if len(nodes) < 3:
    errors.append(f"cluster profile: {len(nodes)} RabbitMQ nodes, expected 3")
cookies = set()
for name, node in nodes.items():
    if node.get("hostname") != name:
        errors.append(f"{name}: its hostname (so its node name) must be {name}")
    if name not in listed:
        errors.append(f"{name}: not among the cluster's peers in rabbitmq-cluster")
    cookies.add((node.get("environment") or {}).get("RABBITMQ_ERLANG_COOKIE"))
    if "cluster" not in (node.get("profiles") or ["cluster"]):
        errors.append(f"{name}: a peer node outside the cluster profile")
    if node.get("profiles") and not any(
        c.get("source") == "rabbitmq-cluster" for c in node.get("configs", [])
    ):
        errors.append(f"{name}: joins no cluster (no rabbitmq-cluster config)")
if len(cookies) != 1 or None in cookies:
    errors.append("cluster profile: the RabbitMQ nodes must share one Erlang cookie")
for name, service in services.items():
    url = (service.get("environment") or {}).get("AMQP_URL")
    if not url:
        continue
    hosts = set(re.findall(r"@([\w-]+):5672", url))
    if hosts != set(nodes):
        errors.append(f"{name}: AMQP_URL lists {sorted(hosts)}, not every node {sorted(nodes)}")
    deps = service.get("depends_on") or {}
    for node, spec in nodes.items():
        if "profiles" in spec and node in deps and deps[node].get("required", True):
            errors.append(f"{name}: requires {node}, which only the cluster profile starts")

for binary in re.findall(r"target/release/([\w-]+)", dockerfile):
    if binary not in binaries:
        errors.append(f"Dockerfile copies {binary}, which the workspace does not build")
if not re.search(r"^USER (?!root)\S+", dockerfile, re.M):
    errors.append("Dockerfile: the runtime image must not run as root")

for error in errors:
    print(f"compose: {error}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"compose: {len(services)} services checked")
