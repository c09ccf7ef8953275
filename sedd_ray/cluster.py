"""``cluster.yaml``: offline checks, and the local ``fake_multinode`` twin used in tests.

    cfg = load()                       # the repo's cluster.yaml as a dict
    prepared = validate(cfg)           # Ray's own prepare_config + validate_config (schema)
    problems = check(cfg)              # this project's rules; [] when all hold
    fake = fake_multinode_config(cfg, gcs_address="10.0.0.5:6380")

Ray's schema (``ray/autoscaler/ray-schema.json``) rejects unknown keys at the top level
and in node types, but treats ``provider`` and ``node_config`` as free-form; :func:`check`
adds allowlists for those two (for AWS) so that a misspelled ``InstanceTyp`` fails offline
too, instead of after ``ray up`` has started paying for a head node.

Nothing here starts Ray or talks to a cloud; Ray is imported lazily.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"

# The custom resource that only the head declares: Tune's per-trial drivers request
# {"CPU": 0, DRIVER_RESOURCE: 1}, so they always run on the (CPU-only) head.
DRIVER_RESOURCE = "sedd_driver"

# The fake provider names its head node type this way (ray.autoscaler._private.fake_multi_node).
FAKE_HEAD_NODE_TYPE = "ray.head.default"

# Keys of the AWS provider section and of an EC2 node_config (boto3 create_instances) that
# this project uses or may reasonably use; Ray's schema does not check these sections.
AWS_PROVIDER_KEYS = {
    "type", "region", "availability_zone", "cache_stopped_nodes", "security_group",
    "use_internal_ips", "use_external_head_ip", "key_pair", "aws_credentials", "cloudwatch",
    "disable_launch_config_check",
}
EC2_NODE_CONFIG_KEYS = {
    "InstanceType", "ImageId", "IamInstanceProfile", "BlockDeviceMappings", "KeyName",
    "SubnetIds", "SecurityGroupIds", "InstanceMarketOptions", "TagSpecifications",
    "Placement", "NetworkInterfaces", "MetadataOptions", "UserData", "CapacityReservationSpecification",
    "EbsOptimized", "LaunchTemplate", "InstanceInitiatedShutdownBehavior",
}

_PINNED_REF = re.compile(r"^(v?\d+(\.\d+)*([.-]?[0-9A-Za-z.]+)?|[0-9a-f]{40})$")
_BRANCHES = {"main", "master", "HEAD", "develop", "dev", "trunk"}


class ClusterConfigError(ValueError):
    """cluster.yaml breaks Ray's schema or one of this project's rules."""


def load(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or CLUSTER_YAML) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ClusterConfigError(f"{path or CLUSTER_YAML} is not a YAML mapping")
    return cfg


def validate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray's offline validation, as ``ray up`` does it before touching the cloud: fill in
    the provider's defaults (``prepare_config``), then check the JSON schema
    (``validate_config``; raises ``jsonschema.ValidationError`` on a misspelled key).
    Returns the prepared config; ``cfg`` is not modified."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    if prepared["head_node_type"] not in prepared["available_node_types"]:
        raise ClusterConfigError(f"head_node_type {prepared['head_node_type']!r} is not one "
                                 f"of available_node_types {sorted(prepared['available_node_types'])}")
    return prepared


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = cfg["head_node_type"]
    return {k: v for k, v in cfg["available_node_types"].items() if k != head}


def _commands(cfg: dict[str, Any], *keys: str) -> list[str]:
    return [c for k in keys for c in cfg.get(k) or []]


def pinned_ref(cfg: dict[str, Any]) -> str | None:
    """The git ref the setup commands check out (``SEDD_RAY_REF=...``), or None."""
    for cmd in _commands(cfg, "setup_commands", "head_setup_commands", "worker_setup_commands"):
        m = re.search(r"SEDD_RAY_REF=(\S+?);", cmd)
        if m:
            return m.group(1).strip("'\"")
    return None


def pinned_versions(cfg: dict[str, Any]) -> dict[str, str]:
    """``{package: version}`` of the ``pkg==version`` pins written by the setup commands."""
    pins: dict[str, str] = {}
    for cmd in _commands(cfg, "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for name, version in re.findall(r"\b([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.+\-]*)", cmd):
            pins.setdefault(name.lower(), version.rstrip("'\""))
    return pins


def check(cfg: dict[str, Any]) -> list[str]:
    """This project's rules for cluster.yaml; returns the problems found ([] = fine)."""
    problems: list[str] = []
    nodes = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in nodes:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(nodes)}"]
    head_res = nodes[head].get("resources") or {}
    workers = worker_types(cfg)

    # Drivers on the head: the driver resource there and only there; no compute on the head.
    if head_res.get(DRIVER_RESOURCE, 0) < 1:
        problems.append(f"head node type {head!r} must declare the custom resource "
                        f"{DRIVER_RESOURCE!r} (>= 1) so that Tune drivers run there")
    if head_res.get("CPU") != 0 or head_res.get("GPU", 0) != 0:
        problems.append(f"head node type {head!r} must declare CPU: 0 and no GPU, so that no "
                        f"Train worker or CPU task lands on it (got {head_res})")
    meta = (cfg.get("metadata") or {}).get("sedd_ray") or {}
    if meta.get("driver_resource", DRIVER_RESOURCE) != DRIVER_RESOURCE:
        problems.append(f"metadata.sedd_ray.driver_resource must be {DRIVER_RESOURCE!r}")

    # GPU workers, autoscaled.
    if not workers:
        problems.append("no worker node types")
    for name, nt in workers.items():
        res = nt.get("resources") or {}
        if DRIVER_RESOURCE in res:
            problems.append(f"worker type {name!r} must not declare {DRIVER_RESOURCE!r}")
        if res.get("GPU", 0) < 1:
            problems.append(f"worker type {name!r} must declare its GPUs in resources (got {res})")
        if res.get("CPU", 0) < 1:
            problems.append(f"worker type {name!r} must declare its CPUs in resources (got {res})")
        lo, hi = nt.get("min_workers"), nt.get("max_workers")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
            problems.append(f"worker type {name!r} needs 0 <= min_workers <= max_workers, "
                            f"max_workers >= 1 (got {lo}, {hi})")
    if not (cfg.get("idle_timeout_minutes") or 0) > 0:
        problems.append("idle_timeout_minutes must be set (> 0) so idle GPU nodes go away")

    # The provider: AWS, keys spelled right, nothing open but SSH.
    provider = cfg.get("provider") or {}
    if provider.get("type") == "aws":
        for key in sorted(set(provider) - AWS_PROVIDER_KEYS):
            problems.append(f"provider: unknown key {key!r} (misspelled?)")
        for name, nt in nodes.items():
            for key in sorted(set(nt.get("node_config") or {}) - EC2_NODE_CONFIG_KEYS):
                problems.append(f"{name}.node_config: unknown key {key!r} (misspelled?)")
            if "SecurityGroupIds" in (nt.get("node_config") or {}):
                problems.append(f"{name}: SecurityGroupIds bypasses the checked security group")
            if "IamInstanceProfile" not in (nt.get("node_config") or {}):
                problems.append(f"{name}: needs an IamInstanceProfile (S3 storage)")
        rules = (provider.get("security_group") or {}).get("IpPermissions")
        if rules is None:
            problems.append("provider.security_group.IpPermissions must be given (only port 22)")
        for rule in rules or []:
            if not (rule.get("FromPort") == 22 and rule.get("ToPort") == 22):
                problems.append(f"security group rule opens more than SSH: {rule}")
    for cmd in _commands(cfg, "head_start_ray_commands", "worker_start_ray_commands"):
        if "--ray-client-server-port" in cmd:
            problems.append("the Ray client server must stay closed (no --ray-client-server-port)")

    # Token authentication on every node.
    mounts = cfg.get("file_mounts") or {}
    if "~/.ray/auth_token" not in mounts:
        problems.append("file_mounts must copy ~/.ray/auth_token to every node")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key) or [] if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{key}: `ray start` must run with RAY_AUTH_MODE=token")
    if not any("RAY_AUTH_MODE=token" in c for c in _commands(cfg, "setup_commands")):
        problems.append("setup_commands must put RAY_AUTH_MODE=token in every shell (drivers)")

    # A pinned version of this project and of its heavy dependencies.
    ref = pinned_ref(cfg)
    if ref is None:
        problems.append("setup_commands must check out a pinned SEDD_RAY_REF=<tag or sha>;")
    elif ref in _BRANCHES or not _PINNED_REF.match(ref):
        problems.append(f"SEDD_RAY_REF={ref!r} is not a tag or a full commit sha")
    pins = pinned_versions(cfg)
    for pkg in ("ray", "torch"):
        if pkg not in pins:
            problems.append(f"setup commands must pin {pkg}==<version>")
    setup = " ".join(_commands(cfg, "head_setup_commands", "worker_setup_commands"))
    if "scripts/setup.sh" not in setup:
        problems.append("head and worker setup must install the project with scripts/setup.sh")
    storage = meta.get("storage", "")
    if not str(storage).startswith("s3://"):
        problems.append(f"metadata.sedd_ray.storage must be an s3:// URI (got {storage!r})")
    return problems


def fake_multinode_config(
    cfg: dict[str, Any], *, gcs_address: str | None = None, max_workers_per_type: int = 2,
    idle_timeout_minutes: float = 1.0, object_store_memory: int = 100 * 1024 ** 2,
) -> dict[str, Any]:
    """The same cluster on one machine (Ray's ``fake_multinode`` provider, for tests).

    Same node types and custom resources; the provider swapped; every GPU becomes one
    CPU slot (a trial's Train worker asks for 1 CPU here where it asks for 1 GPU on
    AWS), so the head keeps CPU 0 and only autoscaled workers can run Train workers.
    ``max_workers_per_type`` caps each type for a small machine. The result is complete
    (the monitor reads it without filling in defaults) and passes ``validate_config``.
    ``gcs_address`` must be given unless the head runs on the default port 6379.
    """
    head = cfg["head_node_type"]
    types: dict[str, Any] = {}
    for name, nt in cfg["available_node_types"].items():
        res = {k: int(v) for k, v in (nt.get("resources") or {}).items()}
        gpus = res.pop("GPU", 0)
        if name == head:
            types[FAKE_HEAD_NODE_TYPE] = {"resources": res, "node_config": {}, "max_workers": 0}
            continue
        res["CPU"] = gpus if gpus else res.get("CPU", 1)
        res["object_store_memory"] = object_store_memory
        types[name] = {
            "resources": res, "node_config": {}, "min_workers": 0,
            "max_workers": min(int(nt.get("max_workers", max_workers_per_type)), max_workers_per_type),
        }
    # As Ray's own fake_multi_node/example.yaml (absent from the wheel): several nodes share
    # one IP, so key them by node id; nothing to ssh into or to re-launch on config change.
    provider: dict[str, Any] = {
        "type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
        "disable_launch_config_check": True,
        # Launch `count` nodes per request, as a cloud provider does (the fake one
        # otherwise starts one node per request, whatever the count).
        "launch_multiple": True,
    }
    if gcs_address:
        provider["gcs_address"] = gcs_address
    return {
        "cluster_name": f"{cfg.get('cluster_name', 'sedd-ray')}-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": float(cfg.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider,
        "auth": {},
        "docker": {},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "metadata": copy.deepcopy(cfg.get("metadata") or {}),
    }


def head_start_args(fake: dict[str, Any]) -> list[str]:
    """``ray start --head`` arguments giving the local head the resources of its node type."""
    import json

    res = dict(fake["available_node_types"][fake["head_node_type"]]["resources"])
    args = [f"--num-cpus={res.pop('CPU', 0)}", f"--num-gpus={res.pop('GPU', 0)}"]
    if res:
        args.append(f"--resources={json.dumps(res)}")
    return args
