"""``cluster.yaml``: offline checks before ``ray up``, and its ``fake_multinode`` twin.

From the shell (no cloud access, no Ray started)::

    python -m sedd_ray.cluster check cluster.yaml   # Ray's schema + this project's rules
    python -m sedd_ray.cluster fake cluster.yaml -o fake.yaml --gcs-address HOST:PORT

``check`` exits 0 when the file passes, 2 with one ``error:`` line when it does not.
``fake`` writes the same cluster for Ray's ``fake_multinode`` provider (a simulated
autoscaling cluster on one machine) and prints the ``ray start`` command that runs it.

From Python::

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
import logging
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"

# The custom resource that only the head declares: Tune's per-trial drivers request
# {"CPU": 0, DRIVER_RESOURCE: 0.001} (sedd_ray.study.driver_resources), so they always
# run on the (CPU-only) head. Defined here only; sedd_ray.study imports it.
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

    if not isinstance(cfg.get("provider"), dict) or "type" not in cfg["provider"]:
        raise ClusterConfigError("provider.type is missing (e.g. provider: {type: aws, ...})")
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
    nodes = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if head not in nodes:
        return [f"head_node_type {head!r} is not one of available_node_types {sorted(nodes)}"]
    return [p for rule in _RULES for p in rule(cfg)]


def _drivers_on_the_head(cfg: dict[str, Any]) -> list[str]:
    """The driver resource on the head and only there; no compute on the head."""
    problems: list[str] = []
    head = cfg["head_node_type"]
    head_res = cfg["available_node_types"][head].get("resources") or {}
    if head_res.get(DRIVER_RESOURCE, 0) < 1:
        problems.append(f"head node type {head!r} must declare the custom resource "
                        f"{DRIVER_RESOURCE!r} (>= 1) so that Tune drivers run there")
    if head_res.get("CPU") != 0 or head_res.get("GPU", 0) != 0:
        problems.append(f"head node type {head!r} must declare CPU: 0 and no GPU, so that no "
                        f"Train worker or CPU task lands on it (got {head_res})")
    if _meta(cfg).get("driver_resource", DRIVER_RESOURCE) != DRIVER_RESOURCE:
        problems.append(f"metadata.sedd_ray.driver_resource must be {DRIVER_RESOURCE!r}")
    return problems


def _autoscaled_gpu_workers(cfg: dict[str, Any]) -> list[str]:
    workers = worker_types(cfg)
    problems = [] if workers else ["no worker node types"]
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
    return problems


def _aws_provider(cfg: dict[str, Any]) -> list[str]:
    """The provider: AWS keys spelled right, an instance profile, nothing open but SSH."""
    provider = cfg.get("provider") or {}
    if provider.get("type") != "aws":
        return []
    problems = [f"provider: unknown key {key!r} (misspelled?)"
                for key in sorted(set(provider) - AWS_PROVIDER_KEYS)]
    for name, nt in cfg["available_node_types"].items():
        node_config = nt.get("node_config") or {}
        for key in sorted(set(node_config) - EC2_NODE_CONFIG_KEYS):
            problems.append(f"{name}.node_config: unknown key {key!r} (misspelled?)")
        if "SecurityGroupIds" in node_config:
            problems.append(f"{name}: SecurityGroupIds bypasses the checked security group")
        if "IamInstanceProfile" not in node_config:
            problems.append(f"{name}: needs an IamInstanceProfile (S3 storage)")
    rules = (provider.get("security_group") or {}).get("IpPermissions")
    if rules is None:
        problems.append("provider.security_group.IpPermissions must be given (only port 22)")
    for rule in rules or []:
        if not (rule.get("FromPort") == 22 and rule.get("ToPort") == 22):
            problems.append(f"security group rule opens more than SSH: {rule}")
    return problems


def _closed_ports_and_token_auth(cfg: dict[str, Any]) -> list[str]:
    """No Ray client server; token authentication on every node and in every shell."""
    problems: list[str] = []
    for cmd in _commands(cfg, "head_start_ray_commands", "worker_start_ray_commands"):
        if "--ray-client-server-port" in cmd:
            problems.append("the Ray client server must stay closed (no --ray-client-server-port)")
    if "~/.ray/auth_token" not in (cfg.get("file_mounts") or {}):
        problems.append("file_mounts must copy ~/.ray/auth_token to every node")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key) or [] if "ray start" in c]
        if not starts or not all("RAY_AUTH_MODE=token" in c for c in starts):
            problems.append(f"{key}: `ray start` must run with RAY_AUTH_MODE=token")
    if not any("RAY_AUTH_MODE=token" in c for c in _commands(cfg, "setup_commands")):
        problems.append("setup_commands must put RAY_AUTH_MODE=token in every shell (drivers)")
    return problems


def _pinned_setup_and_s3(cfg: dict[str, Any]) -> list[str]:
    """A pinned version of this project and of its heavy dependencies; results on S3."""
    problems: list[str] = []
    ref = pinned_ref(cfg)
    if ref is None:
        problems.append("setup_commands must check out a pinned SEDD_RAY_REF=<tag or sha>;")
    elif ref in _BRANCHES or not _PINNED_REF.match(ref):
        problems.append(f"SEDD_RAY_REF={ref!r} is not a tag or a full commit sha")
    pins = pinned_versions(cfg)
    problems += [f"setup commands must pin {pkg}==<version>" for pkg in ("ray", "torch")
                 if pkg not in pins]
    if "scripts/setup.sh" not in " ".join(_commands(cfg, "head_setup_commands",
                                                    "worker_setup_commands")):
        problems.append("head and worker setup must install the project with scripts/setup.sh")
    storage = _meta(cfg).get("storage", "")
    if not str(storage).startswith("s3://"):
        problems.append(f"metadata.sedd_ray.storage must be an s3:// URI (got {storage!r})")
    return problems


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    return (cfg.get("metadata") or {}).get("sedd_ray") or {}


# The rules of check(), in the order their problems are listed.
_RULES = (_drivers_on_the_head, _autoscaled_gpu_workers, _aws_provider,
          _closed_ports_and_token_auth, _pinned_setup_and_s3)


def fake_multinode_config(
    cfg: dict[str, Any], *, gcs_address: str | None = None, max_workers_per_type: int = 2,
    idle_timeout_minutes: float = 1.0, object_store_memory: int = 100 * 1024 ** 2,
) -> dict[str, Any]:
    """The same cluster on one machine (Ray's ``fake_multinode`` provider).

    Same node types and custom resources; the provider swapped; every GPU becomes one
    CPU slot (a trial's Train worker asks for 1 CPU here where it asks for 1 GPU on
    AWS), so the head keeps CPU 0 and only autoscaled workers can run Train workers.
    ``max_workers_per_type`` caps each type for a small machine. The result is complete
    (the monitor reads it without filling in defaults) and passes ``validate_config``.
    ``gcs_address`` must be given unless the head runs on the default port 6379.
    """
    types = _fake_node_types(cfg, max_workers_per_type, object_store_memory)
    empty_lists = ("cluster_synced_files", "rsync_exclude", "rsync_filter",
                   "initialization_commands", "setup_commands", "head_setup_commands",
                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": f"{cfg.get('cluster_name', 'sedd-ray')}-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in types.values()),
        "upscaling_speed": float(cfg.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": _fake_provider(gcs_address),
        "auth": {},
        "docker": {},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": types,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
        "metadata": copy.deepcopy(cfg.get("metadata") or {}),
    }


def _fake_node_types(cfg: dict[str, Any], max_workers_per_type: int,
                     object_store_memory: int) -> dict[str, Any]:
    """cluster.yaml's node types for the fake provider: GPUs as CPU slots, capped counts."""
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
    return types


def _fake_provider(gcs_address: str | None) -> dict[str, Any]:
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
    return provider


def head_start_args(fake: dict[str, Any]) -> list[str]:
    """``ray start --head`` arguments giving the local head the resources of its node type."""
    import json

    res = dict(fake["available_node_types"][fake["head_node_type"]]["resources"])
    args = [f"--num-cpus={res.pop('CPU', 0)}", f"--num-gpus={res.pop('GPU', 0)}"]
    if res:
        args.append(f"--resources={json.dumps(res)}")
    return args


# --- the command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import jsonschema

    args = _parser().parse_args(argv)
    # prepare_config logs the defaults it fills in; the answer here is one line.
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        cfg = load(args.path)
        validate(cfg)
        if args.command == "check":
            problems = check(cfg)
            if problems:
                raise ClusterConfigError(f"{len(problems)} problem(s): " + "; ".join(problems))
            print(f"{args.path}: passes Ray's schema and this project's rules")
        else:
            _write_fake(cfg, args)
    except jsonschema.ValidationError as e:  # Ray's schema: name the key's place
        where = ".".join(str(k) for k in e.absolute_path)
        print(f"error: {args.path}: {where + ': ' if where else ''}{e.message}", file=sys.stderr)
        return 2
    except (ClusterConfigError, OSError, yaml.YAMLError) as e:
        print(f"error: {args.path}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m sedd_ray.cluster",
                                description="Offline checks of cluster.yaml (no cloud, no Ray).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="Ray's own schema validation and this project's rules")
    c.add_argument("path", nargs="?", default=str(CLUSTER_YAML), help="default: the repo's")
    f = sub.add_parser("fake", help="write the fake_multinode twin (a simulated autoscaling "
                       "cluster on this machine) and print the `ray start` that runs it")
    f.add_argument("path", nargs="?", default=str(CLUSTER_YAML), help="default: the repo's")
    f.add_argument("-o", "--output", required=True, help="where to write the fake config")
    f.add_argument("--gcs-address", default=None,
                   help="HOST:PORT the local head will listen on (default: port 6379)")
    f.add_argument("--max-workers-per-type", type=int, default=2)
    f.add_argument("--idle-timeout-minutes", type=float, default=1.0)
    return p


def _write_fake(cfg: dict[str, Any], args: Any) -> None:
    fake = fake_multinode_config(cfg, gcs_address=args.gcs_address,
                                 max_workers_per_type=args.max_workers_per_type,
                                 idle_timeout_minutes=args.idle_timeout_minutes)
    Path(args.output).write_text(yaml.safe_dump(fake, sort_keys=False))
    where = ["--port=6379"]
    if args.gcs_address:
        host, port = args.gcs_address.rsplit(":", 1)
        where = [f"--port={port}", f"--node-ip-address={host}"]
    start = [*where, f"--autoscaling-config={args.output}", *head_start_args(fake)]
    print(f"wrote {args.output}; start it with:\n  RAY_FAKE_CLUSTER=1 ray start --head "
          + " ".join(f"'{a}'" if "{" in a else a for a in start))


if __name__ == "__main__":
    raise SystemExit(main())
