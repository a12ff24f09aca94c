"""The files in clusters/, checked offline: KubeRay manifests against the KubeRay v1 CRDs (strictly, so a misspelt
field fails) and against the operator's own rules, the cluster launcher config against Ray's schema, the Slurm
script's syntax, and everywhere: the pinned Ray image and versions, configs that exist, and storage: the shared-volume
files mount one volume on every node, the bucket files (`*-s3.yaml`) share nothing but the bucket."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from lookahead_ray.config.loader import load_config
from lookahead_ray.jobs.versions import DEEPSPEED_VERSION, RAY_IMAGE, RAY_VERSION, TORCH_VERSION

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
KUBERAY_CRDS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SHARED_MOUNT = "/mnt/cluster_storage"
BUCKET = "s3://"
SHARED_VOLUME_KINDS = {"persistentVolumeClaim", "nfs", "csi", "cephfs", "glusterfs", "azureFile"}
SHARED_FS = re.compile(r"\b(efs|nfs4?)\b|cluster_storage", re.IGNORECASE)
GPU = "nvidia.com/gpu"
FAST_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml reads them 10x faster

KUBERAY_FILES = sorted((CLUSTERS / "kuberay").glob("*.yaml"))
RAY_UP_FILES = sorted((CLUSTERS / "ray-up").glob("*.yaml"))
SBATCH = CLUSTERS / "slurm" / "lookahead.sbatch"
ALL_FILES = sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def is_bucket_file(path: Path) -> bool:
    """The bucket-only files are named `*-s3.yaml`; every other one mounts shared storage."""
    return path.stem.endswith("-s3")


def _manifests(paths: list[Path]) -> list[tuple[str, dict]]:
    return [(f"{path.name}#{i}", doc) for path in paths
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def _rayjobs(manifests):
    return [(name, doc) for name, doc in manifests if doc["kind"] == "RayJob"]


MANIFESTS = _manifests(KUBERAY_FILES)
RAYJOBS = _rayjobs(MANIFESTS)
SHARED_MANIFESTS = _manifests([p for p in KUBERAY_FILES if not is_bucket_file(p)])
BUCKET_MANIFESTS = _manifests([p for p in KUBERAY_FILES if is_bucket_file(p)])
SHARED_RAYJOBS, BUCKET_RAYJOBS = _rayjobs(SHARED_MANIFESTS), _rayjobs(BUCKET_MANIFESTS)
SHARED_RAY_UP = [p for p in RAY_UP_FILES if not is_bucket_file(p)]
BUCKET_RAY_UP = [p for p in RAY_UP_FILES if is_bucket_file(p)]


def _ids(items):
    return [name for name, _ in items]


# --- the KubeRay CRD schemas, made strict ---------------------------------------------------------------------

SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
SCHEMA_VALUES = ("items", "additionalProperties", "not")


def strict(schema: dict) -> dict:
    """An OpenAPI v3 schema from a CRD as JSON Schema the way the API server applies it: Kubernetes' extensions
    translated and unknown fields refused (the API server prunes them silently, which hides a misspelling)."""
    out = dict(schema)
    for key in SCHEMA_MAPS:
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in SCHEMA_LISTS:
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    for key in SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"{KUBERAY_CRDS} is absent (the KubeRay CRDs live in ../shared/schemas/kuberay next to the checkout)")
    crd = yaml.load((KUBERAY_CRDS / CRD_FILES[kind]).read_text(), Loader=FAST_YAML)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in crd_validator(doc["kind"]).iter_errors(doc)]


def test_kuberay_has_a_cluster_and_a_job_for_train_and_tune():
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds.count("RayCluster") >= 1 and kinds.count("RayJob") >= 2, kinds
    commands = {shlex.split(doc["spec"]["entrypoint"])[1] for _, doc in RAYJOBS}
    assert {"train", "tune"} <= commands


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_manifest_matches_the_kuberay_v1_crd(name, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in CRD_FILES, name
    assert crd_errors(doc) == []


@pytest.mark.parametrize("where,key", [("spec", "rayVersion"), ("worker container", "image")])
def test_a_misspelt_field_fails_the_strict_crd_schema(where, key):
    """The strictness is what the schema check is worth: a misspelt key at the top or deep in a pod template."""
    doc = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "RayCluster"))
    spec = doc["spec"]
    target = spec if where == "spec" else spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    target[key + "n"] = target.pop(key)
    errors = crd_errors(doc)
    assert any(f"'{key}n' was unexpected" in e for e in errors), errors


# --- the operator's rules and this project's, not in the schema -------------------------------------------------

def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return pods + [(group["groupName"], group["template"]["spec"]) for group in spec.get("workerGroupSpecs", [])]


def runtime_env(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")


def pip_packages(env: dict) -> list[str]:
    pip = env.get("pip") or []
    return pip.get("packages", []) if isinstance(pip, dict) else pip


def check_installs(requirements: list[str], where: str) -> None:
    """No Ray over the image's; DeepSpeed and torch at the pinned versions (torch installed with DeepSpeed, so
    the project's unpinned torch requirement never resolves on its own)."""
    parsed = [Requirement(r) for r in requirements]
    names = {r.name.lower() for r in parsed}
    assert "ray" not in names, f"{where}: installs ray over the image's Ray {RAY_VERSION}"
    assert "deepspeed" not in names or "torch" in names, f"{where}: installs deepspeed without the pinned torch"
    for req in parsed:
        if req.name.lower() == "deepspeed":
            assert str(req.specifier) == f"=={DEEPSPEED_VERSION}", f"{where}: {req}"
        if req.name.lower() == "torch":
            assert str(req.specifier) == f"=={TORCH_VERSION}", f"{where}: {req}"


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {shlex.join(args)}"
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_follows_the_operator_rules(name, doc):
    spec = doc["spec"]
    assert "rayClusterSpec" in spec, f"{name}: a RayJob without clusterSelector needs rayClusterSpec"
    if "ttlSecondsAfterFinished" in spec:
        assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: ttlSecondsAfterFinished needs shutdown"
    assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: a finished job would keep its GPUs"


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_gpu_workers_request_limit_and_tolerate_gpus(name, doc):
    groups = cluster_spec(doc).get("workerGroupSpecs", [])
    assert groups, f"{name}: no worker group"
    for group in groups:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert resources["limits"].get(GPU) and resources["requests"].get(GPU) == resources["limits"][GPU], name
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", []), name


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=_ids(MANIFESTS))
def test_every_pod_runs_the_pinned_ray_image(name, doc):
    assert cluster_spec(doc)["rayVersion"] == RAY_VERSION, name
    for group, pod in pod_specs(doc):
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["image"] == RAY_IMAGE, f"{name} {group}: {container['image']}"


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_runtime_env_pins_deepspeed_and_never_installs_ray(name, doc):
    env = runtime_env(doc)
    packages = pip_packages(env)
    assert env.get("working_dir"), f"{name}: the job needs the project's configs/ in its working_dir"
    assert any(Requirement(p).name.lower() == "deepspeed" for p in packages), f"{name}: DeepSpeed is not pinned"
    check_installs(packages, name)


@pytest.mark.parametrize("name,doc", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_entrypoint_config_and_overrides_load(name, doc):
    """A misspelt override key or a missing config fails here, not after the cluster has started."""
    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[0] == "lookahead-ray", name
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    load_config(REPO / option(args, "--config"), overrides)


# --- shared-volume manifests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,doc", SHARED_MANIFESTS, ids=_ids(SHARED_MANIFESTS))
def test_shared_storage_is_mounted_in_every_pod(name, doc):
    claims = set()
    for group, pod in pod_specs(doc):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == SHARED_MOUNT]
            assert mounts, f"{name} {group}: {SHARED_MOUNT} is not mounted in {container['name']}"
            claim = volumes[mounts[0]["name"]].get("persistentVolumeClaim")
            assert claim, f"{name} {group}: {SHARED_MOUNT} must be a PersistentVolumeClaim every pod shares"
            claims.add(claim["claimName"])
    assert len(claims) == 1, f"{name}: pods mount different claims {claims}"


@pytest.mark.parametrize("name,doc", SHARED_RAYJOBS, ids=_ids(SHARED_RAYJOBS))
def test_rayjob_writes_to_shared_storage(name, doc):
    args = shlex.split(doc["spec"]["entrypoint"])
    assert option(args, "--output-dir").startswith(SHARED_MOUNT + "/"), name
    if args[1] == "train":
        storage = [a.split("=", 1)[1] for a in args if a.startswith("train.storage_path=")]
        assert storage and storage[0].startswith(SHARED_MOUNT + "/"), f"{name}: train.storage_path off shared storage"


# --- bucket-only manifests -------------------------------------------------------------------------------------

LOCATION_KEYS = ("train.output_dir", "train.storage_path", "tune.output_dir", "model.name_or_path", "model.tokenizer",
                 "data.inputs")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_both_storage_options_have_files():
    assert SHARED_RAYJOBS and BUCKET_RAYJOBS, "a RayJob for each of shared storage and a bucket"
    assert SHARED_RAY_UP and BUCKET_RAY_UP, "a launcher config for each of shared storage and a bucket"


def ray_containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group, container, the pod's volumes by name) for every Ray container: the first of each pod."""
    return [(group, pod["containers"][0], {v["name"]: v for v in pod.get("volumes", [])})
            for group, pod in pod_specs(doc)]


@pytest.mark.parametrize("name,doc", BUCKET_MANIFESTS, ids=_ids(BUCKET_MANIFESTS))
def test_bucket_manifest_mounts_no_shared_storage(name, doc):
    for group, pod in pod_specs(doc):
        for volume in pod.get("volumes", []):
            kinds = SHARED_VOLUME_KINDS & volume.keys()
            assert not kinds, f"{name} {group}: volume {volume['name']} is {kinds.pop()}: a bucket file shares nothing"
            assert not SHARED_FS.search(json.dumps(volume)), f"{name} {group}: {volume}"
        for container in pod["containers"] + pod.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert not SHARED_FS.search(f"{mount['name']} {mount['mountPath']}"), f"{name} {group}: {mount}"


def location_arguments(args: list[str]) -> dict[str, list[str]]:
    """The locations an entrypoint names: --output-dir (as the command's <command>.output_dir) and the overrides
    of LOCATION_KEYS, a list override split into its items."""
    found = {f"{args[1]}.output_dir": [option(args, "--output-dir")]}
    for arg in args:
        key, _, value = arg.partition("=")
        if key in LOCATION_KEYS or (key.startswith("eval.") and key.endswith(".path")):
            items = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
            found[key] = [item.strip().strip("'\"") for item in items]
    return found


def test_location_arguments_reads_flags_and_list_overrides():
    args = shlex.split("lookahead-ray tune --config c.yaml --output-dir s3://b/o model.name_or_path=/m "
                       "'data.inputs=[s3://b/a.jsonl, s3://b/b.jsonl]' eval.utility.path=v.jsonl train.epochs=1")
    assert location_arguments(args) == {"tune.output_dir": ["s3://b/o"], "model.name_or_path": ["/m"],
                                        "data.inputs": ["s3://b/a.jsonl", "s3://b/b.jsonl"],
                                        "eval.utility.path": ["v.jsonl"]}


@pytest.mark.parametrize("name,doc", BUCKET_RAYJOBS, ids=_ids(BUCKET_RAYJOBS))
def test_bucket_rayjob_reads_and_writes_only_the_bucket(name, doc):
    args = shlex.split(doc["spec"]["entrypoint"])
    locations = location_arguments(args)
    required = {f"{args[1]}.output_dir", "model.name_or_path", "data.inputs"}
    assert required <= locations.keys(), f"{name}: {sorted(required - locations.keys())} not given"
    off = {key: values for key, values in locations.items() if not all(v.startswith(BUCKET) for v in values)}
    assert not off, f"{name}: locations off the bucket {off}"
    # What the job runs with, the config's own paths included (e.g. a tune config's eval splits).
    command, output_dir = args[1], locations[f"{args[1]}.output_dir"][0]
    overrides = [a for a in args if "=" in a and not a.startswith("-")] + [f"{command}.output_dir={output_dir}"]
    config = load_config(REPO / option(args, "--config"), overrides)
    effective = [config.model.name_or_path, *config.data.inputs, getattr(config, command).output_dir]
    effective += [config.train.storage_path] if config.train.storage_path else []
    if command == "tune":
        effective += [s.path for s in (config.eval.harmful, config.eval.harmful_answers, config.eval.utility) if s]
    off = [v for v in effective if not str(v).startswith(BUCKET)]
    assert not off, f"{name}: the job would read or write {off} off the bucket"


@pytest.mark.parametrize("name,doc", BUCKET_MANIFESTS, ids=_ids(BUCKET_MANIFESTS))
def test_every_ray_container_gets_the_same_aws_credentials_from_a_secret(name, doc):
    envs = []
    for group, container, _ in ray_containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        for key in AWS_KEYS:
            ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref.get("name") and ref.get("key"), f"{name} {group}: {key} is not from a Secret"
            assert not ref.get("optional"), f"{name} {group}: {key}: a missing Secret must stop the pod, not start it"
        assert env.get("AWS_DEFAULT_REGION", {}).get("value"), f"{name} {group}: no AWS_DEFAULT_REGION"
        envs.append(container["env"])
    assert all(env == envs[0] for env in envs), f"{name}: the Ray containers' environments differ"


@pytest.mark.parametrize("name,doc", BUCKET_MANIFESTS, ids=_ids(BUCKET_MANIFESTS))
def test_every_ray_container_caches_on_a_node_local_empty_dir(name, doc):
    for group, container, volumes in ray_containers(doc):
        cache = next((e.get("value") for e in container.get("env", []) if e["name"] == "LOOKAHEAD_RAY_CACHE"), None)
        assert cache, f"{name} {group}: LOOKAHEAD_RAY_CACHE is not set (the default is in the container's home)"
        mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == cache), None)
        assert mount, f"{name} {group}: LOOKAHEAD_RAY_CACHE={cache} is not a mount"
        empty_dir = volumes[mount["name"]].get("emptyDir")
        assert empty_dir is not None, f"{name} {group}: the cache at {cache} must be an emptyDir (node-local)"
        assert empty_dir.get("medium") != "Memory", f"{name} {group}: the cache must be on disk, not in memory"
        assert empty_dir.get("sizeLimit"), f"{name} {group}: the cache needs a sizeLimit (the model is 13.5 GB)"


# --- every file in clusters/ -----------------------------------------------------------------------------------

CONFIG_FLAG = re.compile(r"--config[=\s]+[\"']?([^\s\"'\\]+)")


@pytest.mark.parametrize("path", ALL_FILES, ids=[str(p.relative_to(CLUSTERS)) for p in ALL_FILES])
def test_every_config_named_exists(path):
    named = CONFIG_FLAG.findall(path.read_text())
    missing = [c for c in named if not (REPO / c).is_file()]
    assert not missing, f"{path.name} names configs that do not exist: {missing}"


@pytest.mark.parametrize("path", ALL_FILES, ids=[str(p.relative_to(CLUSTERS)) for p in ALL_FILES])
def test_every_version_named_is_the_pinned_one(path):
    text = path.read_text()
    for image in re.findall(r"rayproject/ray:[\w.-]+", text):
        assert image == RAY_IMAGE, f"{path.name}: {image}"
    for version in re.findall(r"(?<![\w-])ray(?:\[[\w,]+\])?==([\w.]+)", text):
        assert version == RAY_VERSION, f"{path.name}: ray=={version}"
    for version in re.findall(r"\bdeepspeed==([\w.]+)", text):
        assert version == DEEPSPEED_VERSION, f"{path.name}: deepspeed=={version}"
    for version in re.findall(r"\btorch==([\w.]+)", text):
        assert version == TORCH_VERSION, f"{path.name}: torch=={version}"


# --- the cluster launcher --------------------------------------------------------------------------------------

VALUE_OPTIONS = {"-r", "-c", "-e", "-i", "-f", "-t", "--requirement", "--constraint", "--editable", "--index-url",
                 "--extra-index-url", "--find-links", "--target"}


def pip_install_arguments(command: str) -> list[str]:
    """The requirements a shell command's `pip install` names (options and their values left out)."""
    tokens = shlex.split(command)
    found, i = [], 0
    while i < len(tokens) - 1:
        if tokens[i].rsplit("/", 1)[-1] in ("pip", "pip3") and tokens[i + 1] == "install":
            i += 2
            while i < len(tokens) and tokens[i] not in ("&&", "||", ";", "|"):
                if tokens[i] in VALUE_OPTIONS:
                    i += 1
                elif not tokens[i].startswith("-"):
                    found.append(tokens[i])
                i += 1
        i += 1
    return found


def launcher_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [c for key in keys for c in config.get(key) or []]
    for node_type in config.get("available_node_types", {}).values():
        commands += [c for key in keys for c in node_type.get(key) or []]
    return commands


@functools.cache
def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed: its autoscaler/ray-schema.json is the launcher's schema")
    return json.loads((Path(spec.origin).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=[p.name for p in RAY_UP_FILES])
def test_ray_up_config_matches_rays_schema_and_pins(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validators.validator_for(ray_schema())(ray_schema()).validate(config)
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [t.get("docker", {}).get("worker_image") for t in config["available_node_types"].values()]
    assert {i for i in images if i} == {RAY_IMAGE}
    installs = [r for command in launcher_commands(config) for r in pip_install_arguments(command)]
    assert any(Requirement(r).name.lower() == "deepspeed" for r in installs), "setup_commands do not pin DeepSpeed"
    check_installs(installs, path.name)


@pytest.mark.parametrize("path", SHARED_RAY_UP, ids=[p.name for p in SHARED_RAY_UP])
def test_ray_up_shared_config_mounts_shared_storage_in_containers(path):
    docker = yaml.safe_load(path.read_text())["docker"]
    assert any(SHARED_MOUNT in option for option in docker.get("run_options", [])), "no shared storage in containers"


def docker_options(config: dict) -> list[str]:
    """The `docker run` arguments of every container: run_options plus the head's and the workers'."""
    docker = config["docker"]
    options = docker.get("run_options", []) + docker.get("head_run_options", []) + docker.get("worker_run_options", [])
    for node_type in config["available_node_types"].values():
        options += node_type.get("docker", {}).get("worker_run_options", [])
    return [arg for option in options for arg in shlex.split(option)]


def docker_flags(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


@pytest.mark.parametrize("path", BUCKET_RAY_UP, ids=[p.name for p in BUCKET_RAY_UP])
def test_ray_up_bucket_config_gives_every_node_an_instance_profile(path):
    config = yaml.safe_load(path.read_text())
    for node_type, spec in config["available_node_types"].items():
        profile = spec["node_config"].get("IamInstanceProfile")
        assert isinstance(profile, dict) and (profile.get("Arn") or profile.get("Name")), \
            f"{node_type}: no IamInstanceProfile (Arn or Name): the node cannot reach the bucket"


@pytest.mark.parametrize("path", BUCKET_RAY_UP, ids=[p.name for p in BUCKET_RAY_UP])
def test_ray_up_bucket_config_mounts_nothing_shared_and_caches_on_local_disk(path):
    config = yaml.safe_load(path.read_text())
    commands = launcher_commands(config)
    assert not [c for c in commands if SHARED_FS.search(c) or re.search(r"\bmount\b", c)], commands
    args = docker_options(config)
    volumes = [v.split(":") for v in docker_flags(args, "-v") + docker_flags(args, "--volume")]
    assert not [v for v in volumes if SHARED_FS.search(":".join(v))], volumes
    env = dict(e.split("=", 1) for e in docker_flags(args, "-e") + docker_flags(args, "--env"))
    assert env.get("AWS_DEFAULT_REGION"), "every container needs AWS_DEFAULT_REGION"
    assert not set(AWS_KEYS) & env.keys(), "keys in the config: the instance profiles give the credentials"
    cache = env.get("LOOKAHEAD_RAY_CACHE")
    assert cache, "LOOKAHEAD_RAY_CACHE is not set in the containers' environment"
    assert any(v[1] == cache for v in volumes if len(v) >= 2), \
        f"LOOKAHEAD_RAY_CACHE={cache} is not a host directory (-v HOST:{cache}): it would be in the container's layer"


def test_ray_up_has_a_launcher_config():
    assert RAY_UP_FILES, "clusters/ray-up/ has no cluster launcher config"


def test_pip_install_arguments_sees_through_options_and_quotes():
    command = 'pip install -q -c c.txt "deepspeed==0.1" "x @ https://h/x.zip" && pip3 install ray'
    assert pip_install_arguments(command) == ["deepspeed==0.1", "x @ https://h/x.zip", "ray"]


# --- Slurm ------------------------------------------------------------------------------------------------------

def shell_commands(script: str) -> list[str]:
    """A script's commands: comments dropped, continued lines joined."""
    lines = re.sub(r"\\\n", " ", script).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_sbatch_script_parses_and_runs_train_through_symmetric_run():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, capture_output=True)
    command = next((c for c in shell_commands(SBATCH.read_text()) if "ray symmetric-run" in c), None)
    assert command, "no `ray symmetric-run` command (comments do not count)"
    args = shlex.split(command)
    ray_args, entrypoint = args[:args.index("--")], args[args.index("--") + 1:]
    assert "--address" in ray_args, "symmetric-run needs the head's --address"
    train = entrypoint[entrypoint.index("lookahead-ray"):]
    assert train[1] == "train" and (REPO / option(train, "--config")).is_file(), shlex.join(train)
    assert any(a.startswith("train.storage_path=") for a in train), "checkpoints must go to shared storage"
