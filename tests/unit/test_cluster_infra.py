"""cluster/, infra/ and jobs/runtime_env.yaml: checked offline.

AWS itself cannot be reached from the tests: the CloudFormation stack deploys into moto's
``mock_aws`` (the only thing mocked), the Ray launcher config goes through Ray's own offline
validator, and the KubeRay manifests are parsed (no Kubernetes API server here).
"""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lensmill.config import load_config

REPO = Path(__file__).resolve().parents[2]
AWS_YAML = REPO / "cluster" / "aws.yaml"
RAYJOB_YAML = REPO / "cluster" / "kuberay" / "rayjob.yaml"
RAYSERVICE_YAML = REPO / "cluster" / "kuberay" / "rayservice.yaml"
CFN_TEMPLATE = REPO / "infra" / "lensmill.yaml"
RUNTIME_ENV_YAML = REPO / "jobs" / "runtime_env.yaml"
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
REGION = "us-west-2"


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _cfn_template() -> dict[str, Any]:
    """The CloudFormation template with its short-form intrinsics (!Ref, !Sub) decoded."""
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(CFN_TEMPLATE))


# --- Ray cluster launcher -----------------------------------------------------------------------


def test_aws_cluster_yaml_passes_ray_validate_config_offline() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(AWS_YAML)
    validate_config(raw)  # schema + head type + min/max workers, as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before talking to AWS
    validate_config(prepared)
    assert prepared["docker"]["image"] == RAY_IMAGE


def test_ray_validate_config_really_rejects_a_bad_launcher_config() -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = _load(AWS_YAML)
    bad["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = _load(AWS_YAML)
    bad["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


def test_aws_cluster_yaml_node_types() -> None:
    config = _load(AWS_YAML)
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == REGION
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu_workers = [
        t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert gpu_types and cpu_workers
    assert all(t["node_config"]["InstanceType"].startswith(("g5.", "g6.")) for t in gpu_types)
    for name, node_type in types.items():
        node_config = node_type["node_config"]
        assert node_config["ImageId"].startswith("ami-"), name  # explicit: the default AMI map is old
        assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    head_profile = head["node_config"]["IamInstanceProfile"]["Arn"]
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in [*gpu_types, *cpu_workers]}
    assert head_profile not in worker_profiles  # workers carry their own (S3-only) profile
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])
    assert "/home/ray/lensmill" in config["file_mounts"]
    assert any("RAY_AUTH_MODE=token" in opt for opt in config["docker"]["run_options"])


def test_aws_cluster_yaml_has_spot_workers_with_on_demand_fallback() -> None:
    """Each worker kind has a spot type and an on-demand type of the same shape; spot comes first."""
    types = _load(AWS_YAML)["available_node_types"]
    workers = {name: t for name, t in types.items() if name != _load(AWS_YAML)["head_node_type"]}

    def is_spot(t: dict[str, Any]) -> bool:
        return t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"

    for kind in ("gpu", "cpu"):
        group = {n: t for n, t in workers.items() if bool(t["resources"].get("GPU")) == (kind == "gpu")}
        spot = [t for t in group.values() if is_spot(t)]
        on_demand = [t for t in group.values() if not is_spot(t)]
        assert spot and on_demand, f"{kind}: need a spot and an on-demand node type, got {sorted(group)}"
        for s in spot:
            twins = [
                t
                for t in on_demand
                if t["resources"] == s["resources"]
                and t["node_config"]["InstanceType"] == s["node_config"]["InstanceType"]
            ]
            assert twins, f"{kind}: no on-demand type with the spot type's resources and instance type"
            # Ray's autoscaler v2 launches the higher priority first among types that fit equally.
            assert all(s.get("priority", 0) > t.get("priority", 0) for t in twins)
    head = types[_load(AWS_YAML)["head_node_type"]]
    assert not is_spot(head)  # losing the head loses the cluster


# --- KubeRay ------------------------------------------------------------------------------------


def _containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _gpu_groups(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        g
        for g in cluster_spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]


def test_kuberay_rayjob_runs_the_pipeline() -> None:
    job = _load(RAYJOB_YAML)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith(
        "python jobs/pipeline.py --config jobs/configs/realistic.yaml"
    )
    overrides = job["spec"]["entrypoint"].split()[4:]
    assert load_config(None, overrides).storage.root.startswith("s3://")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert {c["image"] for c in _containers(cluster)} == {RAY_IMAGE}
    assert _gpu_groups(cluster)


def test_kuberay_rayservice_serves_lensmill_build_app() -> None:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    service = _load(RAYSERVICE_YAML)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [app["import_path"] for app in serve_config["applications"]] == ["lensmill.serve:build_app"]
    # ServeDeploySchema drops unknown keys silently: check the keys ourselves, then validate.
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    for app in serve_config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), app
    ServeDeploySchema.model_validate(serve_config)
    # build_app rejects unknown args (lensmill.serve.BUILD_ARGS); keep this list in step with it.
    for app in serve_config["applications"]:
        assert set(app.get("args", {})) <= {"config_path", "overrides", "model_dir"}
        load_config(None, app["args"].get("overrides", []))  # every override names a real setting
    cluster = service["spec"]["rayClusterConfig"]
    assert {c["image"] for c in _containers(cluster)} == {RAY_IMAGE}
    assert _gpu_groups(cluster)


# --- jobs/runtime_env.yaml ----------------------------------------------------------------------


def test_runtime_env_yaml_makes_lensmill_importable() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load(RUNTIME_ENV_YAML)
    assert env["working_dir"] == "."
    for module in env["py_modules"]:
        folder = REPO / module
        assert folder.is_dir() and (folder / "__init__.py").is_file(), module
    assert any(Path(m).name == "lensmill" for m in env["py_modules"])
    assert {".venv", "lensmill-data", ".git", "tests", "*.parquet", "mlruns"} <= set(env["excludes"])
    assert "RAY_AUTH_MODE" not in env.get("env_vars", {})  # a client/cluster setting, not a job's
    RuntimeEnv(**env)  # Ray's own field validation


# --- CloudFormation -----------------------------------------------------------------------------


def test_cfn_lint_passes_on_the_template() -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), "--", str(CFN_TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, f"cfn-lint failed ({result.returncode}):\n{result.stdout}{result.stderr}"


def test_template_declares_storage_security_and_outputs() -> None:
    template = _cfn_template()
    assert {"BucketName", "MlflowInstanceType", "VpcId", "SubnetId", "AllowedCidr", "KeyName"} <= set(
        template["Parameters"]
    )
    assert template["Parameters"]["MlflowAmiId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    resources = template["Resources"]
    bucket = resources["DataBucket"]["Properties"]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    rules = bucket["LifecycleConfiguration"]["Rules"]
    assert any(r.get("Prefix") == "tmp/" and "ExpirationInDays" in r for r in rules)
    policy = resources["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert any(s["Effect"] == "Deny" and "aws:SecureTransport" in str(s["Condition"]) for s in policy)
    # S3 permissions name the data bucket only.
    for statement in resources["BucketAccessPolicy"]["Properties"]["PolicyDocument"]["Statement"]:
        assert statement["Resource"] != "*"
        assert "DataBucket" in str(statement["Resource"])
    # The head may pass the worker role only; workers get no EC2 or IAM permissions at all.
    head_statements = resources["RayHeadRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    pass_role = [s for s in head_statements if s["Action"] == "iam:PassRole"]
    assert pass_role and all("RayWorkerRole" in str(s["Resource"]) for s in pass_role)
    assert any("ec2:RunInstances" in s["Action"] for s in head_statements)
    assert "Policies" not in resources["RayWorkerRole"]["Properties"]
    assert {"BucketName", "StorageRoot", "HeadInstanceProfileArn", "WorkerInstanceProfileArn"} <= set(
        template["Outputs"]
    )
    assert {"MlflowTrackingUri", "MlflowPublicUrl"} <= set(template["Outputs"])


@pytest.fixture
def mock_aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-process AWS (AWS itself is unreachable here) with fake credentials."""
    from moto import mock_aws

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield


# moto models the stack's resources but ignores the bucket policy and the bucket's versioning,
# public access block and lifecycle settings: those are checked on the template above.
@pytest.mark.filterwarnings("ignore:Tried to parse AWS..S3..BucketPolicy:UserWarning")
def test_stack_deploys_in_moto_mock_aws(mock_aws_env: None) -> None:
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION)
    vpc_id = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    bucket = "lensmill-test-bucket"
    params = {"BucketName": bucket, "VpcId": vpc_id, "SubnetId": subnet_id, "AllowedCidr": "203.0.113.7/32"}
    cfn = boto3.client("cloudformation", region_name=REGION)
    cfn.create_stack(
        StackName="lensmill",
        TemplateBody=CFN_TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
        Capabilities=["CAPABILITY_NAMED_IAM"],
    )
    stack = cfn.describe_stacks(StackName="lensmill")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
    assert outputs["BucketName"] == bucket
    assert outputs["StorageRoot"] == f"s3://{bucket}/lensmill"

    s3 = boto3.client("s3", region_name=REGION)
    assert s3.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    encryption = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
    assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    iam = boto3.client("iam")
    for role, output in (("ray-head", "HeadInstanceProfileArn"), ("ray-worker", "WorkerInstanceProfileArn")):
        profile = iam.get_instance_profile(InstanceProfileName=f"lensmill-{role}")["InstanceProfile"]
        assert profile["Arn"] == outputs[output]
        assert [r["RoleName"] for r in profile["Roles"]] == [f"lensmill-{role}"]
    # The Ray launcher config points at profiles of exactly these names (stack name "lensmill").
    launcher_profiles = {
        t["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        for t in _load(AWS_YAML)["available_node_types"].values()
    }
    assert launcher_profiles == {"lensmill-ray-head", "lensmill-ray-worker"}
    assert iam.list_role_policies(RoleName="lensmill-ray-head")["PolicyNames"] == ["ray-autoscaler"]
    assert iam.list_role_policies(RoleName="lensmill-ray-worker")["PolicyNames"] == []

    # The MLflow server: AMI resolved from the SSM parameter, UserData running mlflow against S3.
    instance_id = outputs["MlflowInstanceId"]
    instance = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert instance["ImageId"].startswith("ami-")
    assert instance["IamInstanceProfile"]["Arn"].endswith("instance-profile/lensmill-mlflow")
    user_data_b64 = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]
    user_data = base64.b64decode(user_data_b64["Value"]).decode()
    assert '"mlflow>=3.17,<3.19"' in user_data
    assert f"--artifacts-destination s3://{bucket}/mlflow" in user_data
    assert "--backend-store-uri sqlite:////var/lib/mlflow/mlflow.db" in user_data
    assert "--host 0.0.0.0 --port 5000" in user_data
    assert "${" not in user_data  # every CloudFormation substitution was made
    assert outputs["MlflowTrackingUri"] == f"http://{instance['PrivateIpAddress']}:5000"
