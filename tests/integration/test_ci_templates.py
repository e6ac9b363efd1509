"""The CI pipeline templates in examples/ci, parsed and their signgate steps run.

Each template must parse as the CI system reads it, and call only signgate commands and options
that exist (the rotation templates too; their jobs are checked, not run). Then, for each key store
(OpenBao Transit, AWS KMS on moto, a CI secret), the key generation job and the build-and-sign
job run as the runner would run them: each step that calls signgate, with the step's env and
the ``${{ ... }}`` expressions (GitHub) or CI/CD variables (GitLab) filled in, against a real
registry and OpenBao. Steps of other tools (checkout, the image build, ``gh``) are not run; their
outcomes (the pushed digest, the docker login) are supplied as they would leave them.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import click
import pytest
import yaml

from signgate.cli.main import cli
from signgate.reference import Repository
from signgate.registry import RegistryClient
from signgate.registry.images import push_image
from tests.integration.moto_server import RunningMoto, running_moto
from tests.integration.openbao_server import OpenBaoServer, running_openbao
from tests.integration.registry_servers import RunningRegistry
from tests.integration.tools import REPO_ROOT, SIGNGATE, run, signgate, tool_env

pytestmark = pytest.mark.integration

EXAMPLES = REPO_ROOT / "examples" / "ci"
GITHUB = EXAMPLES / "github"
GITLAB = EXAMPLES / "gitlab"
TEMPLATES = sorted([*GITHUB.glob("*.yml"), *GITLAB.glob("*.gitlab-ci.yml")])
STORES = ["openbao", "awskms", "ci-secret"]

SHELL_OPERATORS = {">", ">>", "2>", "|", "||", "&&", ";", "<"}
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
SIGNGATE_CALL = re.compile(r"(?:^|[\s;&|(`])signgate\s+([a-z][a-z-]*)(.*)$", re.MULTILINE)


# Reading the templates ------------------------------------------------------------------------


@dataclass(frozen=True)
class SigngateCall:
    command: str
    options: tuple[str, ...]


def signgate_calls(script: str) -> list[SigngateCall]:
    """Every ``signgate COMMAND --option ...`` in a shell script (continuation lines joined)."""
    joined = script.replace("\\\n", " ")
    calls = []
    for match in SIGNGATE_CALL.finditer(joined):
        lexer = shlex.shlex(match[2], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        options = []
        for token in lexer:
            if token in SHELL_OPERATORS:
                break
            if token.startswith("-"):
                options.append(token.partition("=")[0])
        calls.append(SigngateCall(match[1], tuple(options)))
    return calls


def command_options(name: str) -> set[str] | None:
    """The options of ``signgate NAME``, or None when there is no such command."""
    command = cli.get_command(click.Context(cli), name)
    if command is None:
        return None
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)
            if opt.startswith("-")} | {"-h", "--help"}


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path}: not a mapping"
    return document


def scripts(path: Path) -> list[str]:
    """Every shell script of a template: GitHub ``run`` steps, GitLab job scripts."""
    document = load(path)
    if path.parent == GITHUB:
        return [step["run"] for job in document["jobs"].values() for step in job["steps"]
                if "run" in step]
    return ["\n".join(job[part]) for name, job in document.items()
            if isinstance(job, dict) and name not in ("variables", "stages", "include")
            for part in ("before_script", "script") if part in job]


def github_trigger(document: Mapping[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as true.
    trigger = document.get("on", document.get(True))
    assert isinstance(trigger, dict)
    return trigger


def test_the_templates_are_there() -> None:
    names = {p.name for p in TEMPLATES}
    for kind in ("keygen", "build-and-sign", "rotate"):
        assert f"signgate-{kind}.yml" in names
        assert f"signgate-{kind}.gitlab-ci.yml" in names


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_template_calls_only_signgate_commands_that_exist(path: Path) -> None:
    calls = [call for script in scripts(path) for call in signgate_calls(script)]
    assert calls, f"{path.name} calls no signgate command"
    for call in calls:
        options = command_options(call.command)
        assert options is not None, f"signgate {call.command}: no such command"
        unknown = set(call.options) - options
        assert not unknown, f"signgate {call.command} has no option {sorted(unknown)}"


@pytest.mark.parametrize("path", sorted(GITHUB.glob("*.yml")), ids=lambda p: p.name)
def test_github_workflows_keep_expressions_out_of_scripts(path: Path) -> None:
    document = load(path)
    assert document["name"]
    assert github_trigger(document)
    assert document["defaults"]["run"]["shell"] == "bash"
    assert "permissions" in document
    for job in document["jobs"].values():
        assert job["runs-on"]
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), step
            # An expression in a script is a script injection; values come in through env.
            assert "run" not in step or "${{" not in step["run"], step["run"]


@pytest.mark.parametrize("path", sorted(GITLAB.glob("*.gitlab-ci.yml")), ids=lambda p: p.name)
def test_gitlab_jobs_are_well_formed(path: Path) -> None:
    document = load(path)
    jobs = [name for name, job in document.items()
            if isinstance(job, dict) and not name.startswith(".") and name != "variables"]
    assert jobs
    for name in jobs:
        resolved = gitlab_job(document, name)
        assert isinstance(resolved["script"], list), name
        assert all(isinstance(line, str) for line in resolved["script"]), name
        assert resolved["rules"], f"{name}: runs on every pipeline"
        for line in resolved.get("before_script", []):
            assert re.fullmatch(r'pip install --quiet "signgate(\[[a-z,]+\])?==\$\{SIGNGATE_'
                                r'VERSION\}"', line), line


def test_rotation_is_scheduled_against_signgate_rotate() -> None:
    workflow = load(GITHUB / "signgate-rotate.yml")
    (schedule,) = github_trigger(workflow)["schedule"]
    assert len(schedule["cron"].split()) == 5
    assert workflow["concurrency"]["cancel-in-progress"] is False
    (job,) = workflow["jobs"].values()
    rotate_calls = [call for step in job["steps"] if "run" in step
                    for call in signgate_calls(step["run"])]
    assert [call.command for call in rotate_calls] == ["rotate", "rotate"]
    resume, start = rotate_calls
    assert set(resume.options) == {"--resume", "--journal"}
    # The policy reaches the webhooks during the run (the hook), confirmed by each replica.
    delivered = {"--old-key", "--new-key", "--policy", "--journal", "--policy-hook"}
    assert delivered <= set(start.options)
    script = "\n".join(step["run"] for step in job["steps"] if "run" in step)
    assert "--verifier" in script
    assert "kubectl apply" in script

    pipeline = load(GITLAB / "signgate-rotate.gitlab-ci.yml")
    job = gitlab_job(pipeline, "signgate-rotate")
    assert any('$CI_PIPELINE_SOURCE == "schedule"' in rule["if"] for rule in job["rules"])
    assert job["resource_group"]
    script = "\n".join(job["script"])
    calls = signgate_calls(script)
    assert [call.command for call in calls] == ["rotate", "rotate"]
    assert delivered <= set(calls[1].options)
    assert "--verifier" in script
    assert "kubectl apply" in script


def test_the_call_reader_finds_commands_and_options() -> None:
    script = ('signgate sign --key "$K" \\\n  -a "x=1" "$I" > /dev/null\n'
              'echo signgate is here\nx=$(signgate verify --key=k img | tee out)\n')
    assert signgate_calls(script) == [
        SigngateCall("sign", ("--key", "-a")),
        SigngateCall("is", ()),
        SigngateCall("verify", ("--key",)),
    ]
    assert command_options("is") is None
    assert "--key" in (command_options("sign") or set())


# Running GitHub Actions steps -----------------------------------------------------------------


@dataclass
class StepRun:
    name: str
    outputs: dict[str, str]


@dataclass
class GithubJobRun:
    ran: list[StepRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def fill_expressions(text: str, contexts: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        if match[1] not in contexts:
            pytest.fail(f"the test does not know the value of ${{{{ {match[1]} }}}}")
        return contexts[match[1]]

    return EXPRESSION.sub(value, text)


def run_github_job(workflow_file: Path, job_name: str, contexts: Mapping[str, str],
                   runner_env: Mapping[str, str], workspace: Path) -> GithubJobRun:
    """Run the job's steps that call signgate, as the runner runs a ``shell: bash`` step."""
    workflow = load(workflow_file)
    job = workflow["jobs"][job_name]
    assert workflow["defaults"]["run"]["shell"] == "bash"
    result = GithubJobRun()
    outputs: dict[str, str] = {}
    for index, step in enumerate(job["steps"]):
        name = step.get("name") or step.get("uses") or f"step {index}"
        if "run" not in step or not signgate_calls(step["run"]):
            result.skipped.append(name)
            continue
        temp = workspace.parent / "runner-temp"
        temp.mkdir(exist_ok=True)
        output_file = temp / f"output-{index}"
        output_file.touch()
        env = {
            **runner_env,
            "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_OUTPUT": str(output_file),
            "GITHUB_ENV": str(temp / "env"),
            "GITHUB_STEP_SUMMARY": str(temp / "summary.md"),
            "RUNNER_TEMP": str(temp),
            "CI": "true",
        }
        for scope in (workflow, job, step):
            env.update({k: fill_expressions(str(v), {**contexts, **outputs})
                        for k, v in (scope.get("env") or {}).items()})
        script = temp / f"step-{index}.sh"
        script.write_text(step["run"])
        completed = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert completed.returncode == 0, (
            f"{workflow_file.name} {job_name} '{name}' exited {completed.returncode}\n"
            f"stdout: {completed.stdout}\nstderr: {completed.stderr}")
        step_outputs = dict(line.split("=", 1) for line in output_file.read_text().splitlines()
                            if "=" in line)
        if "id" in step:
            outputs.update({f"steps.{step['id']}.outputs.{k}": v
                            for k, v in step_outputs.items()})
        result.ran.append(StepRun(name, step_outputs))
    return result


# Running GitLab CI jobs -----------------------------------------------------------------------


def gitlab_job(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A job with its ``extends`` merged in, as GitLab merges them (deep for mappings)."""
    job = dict(document[name])
    parent_name = job.pop("extends", None)
    if parent_name is None:
        return job
    parent = gitlab_job(document, parent_name)
    merged = {**parent, **job}
    for key in ("variables",):
        if key in parent or key in job:
            merged[key] = {**parent.get(key, {}), **job.get(key, {})}
    return merged


def expand_variables(value: str, env: Mapping[str, str]) -> str:
    """GitLab's expansion of ``$VAR`` and ``${VAR}`` in a variable's value."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


def run_gitlab_job(pipeline_file: Path, job_name: str, *, predefined: Mapping[str, str],
                   project_variables: Mapping[str, str], file_variables: Mapping[str, str],
                   workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run the job's script as a runner with a bash image does (``before_script`` only
    installs signgate, which is on PATH here)."""
    document = load(pipeline_file)
    job = gitlab_job(document, job_name)
    script = "\n".join(job["script"])
    assert signgate_calls(script), f"{job_name} calls no signgate command"
    project = workdir / "project"
    home = workdir / "home"
    for directory in (project, home, workdir / "variables"):
        directory.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {
        "PATH": f"{SIGNGATE.parent}:/usr/bin:/bin", "HOME": str(home), "CI": "true",
        "CI_PROJECT_DIR": str(project), "CI_JOB_NAME": job_name, **predefined,
    }
    # Project variables outrank the file's; file-type ones hold the path of a file.
    settings = dict(project_variables)
    for name, content in file_variables.items():
        path = workdir / "variables" / name
        path.write_text(content)
        settings[name] = str(path)
    for scope in (document.get("variables") or {}, job.get("variables") or {}):
        for name, value in scope.items():
            env[name] = expand_variables(str(value), {**env, **settings})
    env.update(settings)
    script_file = workdir / f"{job_name}.sh"
    script_file.write_text(script + "\n")
    completed = subprocess.run(["bash", "-eo", "pipefail", str(script_file)], cwd=project,
                               env=env, capture_output=True, text=True, timeout=120,
                               check=False)
    assert completed.returncode == 0, (
        f"{pipeline_file.name} {job_name} exited {completed.returncode}\n"
        f"stdout: {completed.stdout}\nstderr: {completed.stderr}")
    return completed


class GitlabVariablesApi:
    """A stand-in for GitLab's project variables API (POST /projects/:id/variables; no GitLab
    runs here): checks the token and the masking rules, and keeps what was created."""

    # https://docs.gitlab.com/ci/variables/#mask-a-cicd-variable
    MASKABLE = re.compile(r"[A-Za-z0-9+/=@:.~_-]{8,}")

    def __init__(self, project_id: str, token: str) -> None:
        self.project_id = project_id
        self.token = token
        self.variables: dict[str, dict[str, str]] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode(),
                                                     keep_blank_values=True).items()}
                status, body = api.create(self.path, self.headers.get("PRIVATE-TOKEN"), form)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v4"

    def create(self, path: str, token: str | None, form: dict[str, str]
               ) -> tuple[int, dict[str, Any]]:
        if token != self.token:
            return 401, {"message": "401 Unauthorized"}
        if path != f"/api/v4/projects/{self.project_id}/variables":
            return 404, {"message": "404 Not Found"}
        if form.get("masked") == "true" and not self.MASKABLE.fullmatch(form.get("value", "")):
            return 400, {"message": {"value": ["cannot be masked"]}}
        if form["key"] in self.variables:
            return 400, {"message": {"key": ["has already been taken"]}}
        variable = {"variable_type": "env_var", "masked": "false", "protected": "false", **form}
        self.variables[form["key"]] = variable
        return 201, variable

    def __enter__(self) -> GitlabVariablesApi:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


# The key stores and the registry --------------------------------------------------------------


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with running_openbao(tmp_path_factory.mktemp("ci-openbao")) as server:
        server.enable_transit("transit")
        yield server


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMoto]:
    with running_moto(tmp_path_factory.mktemp("ci-moto")) as server:
        yield server


@dataclass(frozen=True)
class KeyStore:
    """What a key store needs: the env a runner has (what a credentials action exports), the
    secrets and variables each job reads, and the key references."""

    name: str
    key_name: str
    runner_env: dict[str, str]
    admin_secrets: dict[str, str]
    signing_secrets: dict[str, str]

    @property
    def reference(self) -> str:
        return {"openbao": f"hashivault://{self.key_name}",
                "awskms": f"awskms:///alias/{self.key_name}"}[self.name]


def key_store(name: str, request: pytest.FixtureRequest) -> KeyStore:
    key_name = f"release-{secrets.token_hex(4)}"
    if name == "openbao":
        bao: OpenBaoServer = request.getfixturevalue("openbao")
        # The signing job's token may read the key and sign with it, nothing else.
        signer = bao.token_with_policy(
            f"sign-{key_name}",
            f'path "transit/keys/{key_name}" {{ capabilities = ["read"] }}\n'
            f'path "transit/sign/{key_name}/*" {{ capabilities = ["update"] }}\n')
        settings = {"VAULT_ADDR": bao.address}
        return KeyStore(name, key_name, {}, {**settings, "VAULT_TOKEN": bao.root_token},
                        {**settings, "VAULT_TOKEN": signer})
    if name == "awskms":
        aws: RunningMoto = request.getfixturevalue("moto")
        exported = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": aws.url}
        return KeyStore(name, key_name, exported, {}, {})
    return KeyStore(name, key_name, {}, {}, {})


def push(registry: RunningRegistry, repository: str) -> str:
    async def pushed() -> str:
        async with RegistryClient(registry.options()) as client:
            return await push_image(client, Repository(registry.host, repository), "v1",
                                    content=secrets.token_bytes(16))

    return anyio.run(pushed)


def verify(image: str, key: str, env: Mapping[str, str], cwd: Path, **annotations: str
           ) -> dict[str, Any]:
    """signgate verify as the webhook's check, from the test; the verified payload."""
    flags = [f for k, v in annotations.items() for f in ("-a", f"{k}={v}")]
    result = signgate("verify", "--key", key, *flags, "-o", "json", image, env=dict(env),
                      cwd=cwd)
    payloads = json.loads(result.stdout)
    assert isinstance(payloads, list)
    assert payloads
    payload: dict[str, Any] = payloads[0]
    return payload


def runner_base(home: Path, store: KeyStore) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{SIGNGATE.parent}:/usr/bin:/bin", "HOME": str(home), **store.runner_env}


# GitHub Actions, end to end -------------------------------------------------------------------


@pytest.mark.parametrize("store_name", STORES)
def test_github_keygen_then_build_and_sign(
    store_name: str, request: pytest.FixtureRequest, registry: RunningRegistry, tmp_path: Path
) -> None:
    store = key_store(store_name, request)
    workspace = tmp_path / "keygen" / "workspace"
    workspace.mkdir(parents=True)
    runner = runner_base(tmp_path / "home", store)
    keygen = run_github_job(
        GITHUB / "signgate-keygen.yml", store_name,
        {"inputs.key-name": store.key_name,
         "vars.VAULT_ADDR": store.admin_secrets.get("VAULT_ADDR", ""),
         "secrets.VAULT_KEY_ADMIN_TOKEN": store.admin_secrets.get("VAULT_TOKEN", ""),
         "secrets.SECRETS_ADMIN_TOKEN": "not-used-here"},
        runner, workspace,
    )
    assert (workspace / "signgate.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    if store_name == "ci-secret":
        # Kept in Actions secrets by `gh secret set`: the step this test does not run.
        assert "Keep it in the repository's Actions secrets" in keygen.skipped
        private_key = (workspace / "signgate.key").read_text()
        password = (workspace / "signgate.password").read_text()
        assert private_key.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
        key, public_key = "env://COSIGN_PRIVATE_KEY", "signgate.pub"
    else:
        assert not (workspace / "signgate.key").exists()
        private_key = password = ""
        key = public_key = store.reference

    # The build job: a checkout (with the committed public key), the image pushed by the build
    # action, and the signgate steps.
    checkout = tmp_path / "build" / "workspace"
    checkout.mkdir(parents=True)
    (checkout / "signgate.pub").write_text((workspace / "signgate.pub").read_text())
    repository = f"ci/github-{store_name}-{store.key_name}"
    digest = push(registry, repository)
    image = f"{registry.host}/{repository}"
    sha = secrets.token_hex(20)
    build = run_github_job(
        GITHUB / "signgate-build-and-sign.yml", "build-and-sign",
        {"vars.IMAGE": image, "vars.SIGNGATE_KEY": key, "vars.SIGNGATE_PUBLIC_KEY": public_key,
         "steps.build.outputs.digest": digest,
         "vars.VAULT_ADDR": store.signing_secrets.get("VAULT_ADDR", ""),
         "secrets.VAULT_SIGNING_TOKEN": store.signing_secrets.get("VAULT_TOKEN", ""),
         "secrets.COSIGN_PRIVATE_KEY": private_key, "secrets.COSIGN_PASSWORD": password},
        {**runner, "GITHUB_SHA": sha, "GITHUB_REPOSITORY": "acme/app",
         "GITHUB_WORKFLOW_REF": "acme/app/.github/workflows/build.yml@refs/heads/main"},
        checkout,
    )
    assert [s.name for s in build.ran] == ["Sign the pushed digest", "Verify as the webhook will"]
    payload = verify(f"{image}@{digest}", str(checkout / "signgate.pub"),
                     tool_env(tmp_path / "home"), tmp_path, **{"git-sha": sha})
    assert payload["critical"]["image"]["docker-manifest-digest"] == digest
    assert payload["optional"]["workflow"].endswith("@refs/heads/main")


# GitLab CI, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("store_name", STORES)
def test_gitlab_keygen_then_build_and_sign(
    store_name: str, request: pytest.FixtureRequest, basic_auth_registry: RunningRegistry,
    tmp_path: Path,
) -> None:
    store = key_store(store_name, request)
    keygen_file = GITLAB / "signgate-keygen.gitlab-ci.yml"
    job_name = f"signgate-key-{store_name}"
    rules = gitlab_job(load(keygen_file), job_name)["rules"]
    assert rules == [{"if": f'$CI_PIPELINE_SOURCE == "web" && $SIGNGATE_KEYGEN == '
                            f'"{store_name}"', "when": "manual"}]
    api_token = secrets.token_urlsafe(16)
    with GitlabVariablesApi("4242", api_token) as api:
        predefined = {"CI_API_V4_URL": api.url, "CI_PROJECT_ID": "4242",
                      **runner_base(tmp_path / "runner", store)}
        run_gitlab_job(
            keygen_file, job_name, predefined=predefined,
            project_variables={"SIGNGATE_KEY_NAME": store.key_name,
                               "SIGNGATE_VARIABLES_TOKEN": api_token,
                               "VAULT_KEY_ADMIN_TOKEN": store.admin_secrets.get("VAULT_TOKEN",
                                                                                ""),
                               **{k: v for k, v in store.admin_secrets.items()
                                  if k != "VAULT_TOKEN"}},
            file_variables={}, workdir=tmp_path / "keygen",
        )
    public_key = (tmp_path / "keygen" / "project" / "signgate.pub").read_text()
    assert public_key.startswith("-----BEGIN PUBLIC KEY-----")
    assert not (tmp_path / "keygen" / "project" / "signgate.key").exists()
    file_variables: dict[str, str] = {}
    project_variables = {k: v for k, v in store.signing_secrets.items() if k != "VAULT_TOKEN"}
    project_variables["VAULT_SIGNING_TOKEN"] = store.signing_secrets.get("VAULT_TOKEN", "")
    if store_name == "ci-secret":
        created = api.variables
        assert set(created) == {"SIGNGATE_KEY", "COSIGN_PASSWORD"}
        assert created["SIGNGATE_KEY"]["variable_type"] == "file"
        assert created["SIGNGATE_KEY"]["protected"] == "true"
        assert created["COSIGN_PASSWORD"]["masked"] == "true"
        assert created["SIGNGATE_KEY"]["value"].startswith(
            "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
        file_variables["SIGNGATE_KEY"] = created["SIGNGATE_KEY"]["value"]
        project_variables["COSIGN_PASSWORD"] = created["COSIGN_PASSWORD"]["value"]
        project_variables["SIGNGATE_PUBLIC_KEY"] = "signgate.pub"
    else:
        assert api.variables == {}
        project_variables["SIGNGATE_KEY"] = project_variables["SIGNGATE_PUBLIC_KEY"] = (
            store.reference)

    registry = basic_auth_registry
    repository = f"ci/gitlab-{store_name}-{store.key_name}"
    digest = push(registry, repository)
    sha = secrets.token_hex(20)
    sign_workdir = tmp_path / "sign"
    (sign_workdir / "project").mkdir(parents=True)
    (sign_workdir / "project" / "signgate.pub").write_text(public_key)
    run_gitlab_job(
        GITLAB / "signgate-build-and-sign.gitlab-ci.yml", "sign-image",
        predefined={
            **runner_base(tmp_path / "runner", store),
            "CI_REGISTRY": registry.host, "CI_REGISTRY_IMAGE": f"{registry.host}/{repository}",
            "CI_REGISTRY_USER": str(registry.username),
            "CI_REGISTRY_PASSWORD": str(registry.password),
            "CI_COMMIT_SHA": sha, "CI_PIPELINE_URL": "https://gitlab.example.com/p/-/pipelines/7",
            # From the build job's dotenv report.
            "IMAGE_DIGEST": digest,
        },
        project_variables=project_variables, file_variables=file_variables,
        workdir=sign_workdir,
    )
    env = tool_env(tmp_path / "verifier", SIGNGATE_REGISTRY_PASSWORD=str(registry.password))
    result = run([str(SIGNGATE), "verify", "--key", str(sign_workdir / "project" /
                                                        "signgate.pub"),
                  "--registry-username", str(registry.username), "-a", f"git-sha={sha}",
                  "-o", "json", f"{registry.host}/{repository}@{digest}"], env, tmp_path)
    (payload,) = json.loads(result.stdout)
    assert payload["optional"]["pipeline"].endswith("/pipelines/7")


def test_gitlab_variables_api_refuses_what_gitlab_refuses() -> None:
    with GitlabVariablesApi("1", "token") as api:
        assert api.create("/api/v4/projects/1/variables", "wrong", {"key": "A"})[0] == 401
        assert api.create("/api/v4/projects/1/variables", "token",
                          {"key": "A", "value": "two\nlines", "masked": "true"})[0] == 400
        assert api.create("/api/v4/projects/1/variables", "token",
                          {"key": "A", "value": "x"})[0] == 201
        assert api.create("/api/v4/projects/1/variables", "token",
                          {"key": "A", "value": "x"})[0] == 400


def test_unknown_expressions_fail_the_run() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"\$\{\{ secrets.NOPE \}\}"):
        fill_expressions("${{ secrets.NOPE }}", {})
    assert fill_expressions("a-${{ vars.X }}-b", {"vars.X": "1"}) == "a-1-b"


def test_expanding_gitlab_variables() -> None:
    assert expand_variables("${A}/$B-$C", {"A": "x", "B": "y"}) == "x/y-"
