"""Static checks of the deployment files in docker/: no Docker daemon, no network, no cluster.

Every YAML parses. Every `python -m service.tune ...` written in them (compose commands, the cluster launcher's
commands and comments, the RayJob entrypoint, the Dockerfile's comments, docker/README.md's code blocks) parses with
the service's own argument parser and loads its space file with its overrides (a dry run); every `ray <command>`
parses with Ray's click commands and every `mlflow server` with MLflow's; the cluster launcher config passes Ray's
own schema. Version pins match constraints.txt, published ports listen on 127.0.0.1, Ray avoids 6379 in compose,
and no credential is written down (only `${VAR:-local-dev default}` interpolations and Kubernetes secretKeyRefs).
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from service import tune

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
CLUSTER = DOCKER / "ray-cluster.yaml"
RAYJOB = DOCKER / "rayjob.yaml"
README = DOCKER / "README.md"
ROOT_README = REPO / "README.md"  # its "Running on a cluster" section gives the same routes
PROJECT_IMAGE = "ltssl-tune"  # docker/Dockerfile's image, by whatever registry
RAY_NODES = ("ray-head", "ray-worker", "sweep")  # compose services that run `ray start`

# ---- reading the files ------------------------------------------------------------------------------------------


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def yaml_files() -> list[Path]:
    return sorted(p for p in DOCKER.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def load_yaml(path: Path) -> tuple[Any, ...]:
    return tuple(yaml.safe_load_all(path.read_text()))


def one_doc(path: Path) -> dict[str, Any]:
    docs = load_yaml(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{rel(path)}: expected one YAML mapping"
    return docs[0]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[", 1)[0].strip()).lower()  # PEP 503


@functools.cache
def pins() -> dict[str, str]:
    """constraints.txt: package (canonical name) -> pinned version."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    for name in ("ray", "mlflow", "optuna", "torch", "psycopg", "boto3"):
        assert name in out, f"constraints.txt pins no {name}"
    return out


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@functools.cache
def dockerfile() -> tuple[tuple[Instruction, ...], tuple[str, ...]]:
    """(instructions, comment blocks) of docker/Dockerfile; continuation lines joined, `#` of comments removed."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    block: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            if not pending:  # a comment inside a continued instruction is dropped by Docker
                block.append(stripped[1:])
            continue
        if block:
            comments.append("\n".join(block))
            block = []
        if not stripped:
            continue
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if stripped.endswith("\\"):
            continue
        keyword, _, value = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = []
    assert not pending, "docker/Dockerfile ends inside a continued instruction"
    if block:
        comments.append("\n".join(block))
    return tuple(instructions), tuple(comments)


def instructions(keyword: str) -> list[Instruction]:
    return [i for i in dockerfile()[0] if i.keyword == keyword]


def workdir() -> str:
    dirs = instructions("WORKDIR")
    assert dirs, "docker/Dockerfile sets no WORKDIR"
    return dirs[-1].value


def comment_blocks(text: str) -> list[str]:
    """Runs of full-line `#` comments of a YAML file, `#` removed (shell commands in them keep their `\\` lines)."""
    blocks, block = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped[1:])
        elif block:
            blocks.append("\n".join(block))
            block = []
    if block:
        blocks.append("\n".join(block))
    return blocks


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)


INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Docker Compose's interpolation with nothing set: `${VAR:-default}` -> default, `${VAR}` -> VAR, `$$` -> `$`."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m["arg"] if m["op"] in (":-", "-") else m["name"]

    return INTERPOLATION.sub(sub, value)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every string and every list of strings (an argv or a list of commands) in a YAML."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list) and node and all(isinstance(v, str) for v in node):
        yield path, node
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


# ---- finding commands -------------------------------------------------------------------------------------------


@functools.cache
def ray_cli() -> click.Group:
    from ray.scripts.scripts import cli

    return cli


@functools.cache
def mlflow_server() -> click.Command:
    from mlflow.cli import server

    return server


@dataclass(frozen=True)
class Command:
    where: str  # file and place
    argv: tuple[str, ...]  # program words first: ("python", "-m", "service.tune", ...), ("ray", "start", ...)

    @property
    def kind(self) -> str:
        if self.argv[0] == "ray":
            return f"ray {self.argv[1]}"
        return "mlflow server" if self.argv[0] == "mlflow" else "service.tune"

    @property
    def args(self) -> list[str]:
        return list(self.argv[3:] if self.kind == "service.tune" else self.argv[2:])

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")", "|&"}
HINT = re.compile(r"\bpython3? -m service\.tune\b|\bray [a-z]|\bmlflow server\b")


def prefix_length(tokens: list[str], i: int) -> int:
    """How many tokens from `i` name a command this file checks (0: none)."""
    t = tokens[i : i + 3]
    if len(t) == 3 and t[0] in ("python", "python3") and t[1:] == ["-m", "service.tune"]:
        return 3
    if t[:2] == ["mlflow", "server"]:
        return 2
    if len(t) >= 2 and t[0] == "ray" and t[1] in ray_cli().commands:
        return 2
    return 0


def token_commands(tokens: list[str], where: str) -> Iterator[Command]:
    for i, token in enumerate(tokens):
        if any(c.isspace() for c in token) and HINT.search(token):  # a quoted script: bash -c '...', ray exec '...'
            yield from text_commands(token, where)
            continue
        if n := prefix_length(tokens, i):
            end = i + n
            while end < len(tokens) and tokens[end] not in OPERATORS:
                end += 1
            yield Command(where, tuple(tokens[i:end]))


def text_commands(text: str, where: str) -> Iterator[Command]:
    """Commands in shell text: lines joined at `\\`-newline, split into words and at shell operators."""
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if not HINT.search(line):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as err:  # prose (an apostrophe), or a broken command
            words = line.split()
            if any(prefix_length(words, i) for i in range(len(words))):
                raise AssertionError(
                    f"{where}: a command line that is not valid shell ({err}): {line.strip()}"
                ) from None
            continue
        yield from token_commands(tokens, where)


def yaml_commands(path: Path) -> Iterator[Command]:
    fix = interpolate if path == COMPOSE else (lambda s: s)
    for doc in load_yaml(path):
        for where, value in walk(doc):
            label = f"{rel(path)}: {where}"
            if isinstance(value, list):
                yield from token_commands([fix(v) for v in value], label)
            else:
                yield from text_commands(fix(value), label)
    for block in comment_blocks(path.read_text()):
        yield from text_commands(block, f"{rel(path)}: comment")


def dockerfile_commands() -> Iterator[Command]:
    found, comments = dockerfile()
    for block in comments:
        yield from text_commands(block, f"{rel(DOCKERFILE)}: comment")
    for ins in found:
        where = f"{rel(DOCKERFILE)}:{ins.line} {ins.keyword}"
        if ins.keyword in ("CMD", "ENTRYPOINT") and ins.value.startswith("["):
            yield from token_commands(yaml.safe_load(ins.value), where)
        elif ins.keyword in ("RUN", "CMD", "ENTRYPOINT"):
            yield from text_commands(ins.value, where)


@functools.cache
def commands() -> tuple[Command, ...]:
    found = list(dockerfile_commands())
    for path in yaml_files():
        found += yaml_commands(path)
    for block in code_blocks(README.read_text()):
        found += text_commands(block, f"{rel(README)}: code")
    for block in code_blocks(cluster_section()):
        found += text_commands(block, f"{rel(ROOT_README)}: code")
    return tuple(found)


def cluster_section() -> str:
    text = ROOT_README.read_text()
    start = text.index("## Running on a cluster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def commands_in(path: Path, kind: str) -> list[Command]:
    return [c for c in commands() if c.where.startswith(rel(path) + ":") and c.kind == kind]


def click_parse(cmd: Command) -> dict[str, Any]:
    """The command's parameters as its own click command parses them (unknown flags, bad values: fail)."""
    if cmd.kind == "mlflow server":
        command, name, args = mlflow_server(), "server", cmd.args
    else:
        command, name, args = ray_cli(), "ray", list(cmd.argv[1:])
        while isinstance(command, click.Group):
            name = args.pop(0)
            assert name in command.commands, f"{cmd}: `{name}` is not a subcommand of ray's CLI"
            command = command.commands[name]
    opts = {o for p in command.params for o in p.opts + p.secondary_opts}
    flags = []
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", arg):
            flags.append(arg.split("=", 1)[0])
    unknown = [f for f in flags if f not in opts]
    assert not unknown, f"{cmd}: {unknown} are not options of `{cmd.kind}` (it has {sorted(opts)})"
    try:
        return command.make_context(name, list(args)).params
    except click.ClickException as err:
        raise AssertionError(f"{cmd}: {cmd.kind} rejects it: {err.format_message()}") from None


def tune_args(cmd: Command, capsys: pytest.CaptureFixture) -> Any:
    parser = tune.parser()
    opts = {o for action in parser._actions for o in action.option_strings}
    flags = {a.split("=", 1)[0] for a in cmd.args if a.startswith("--")}
    # in full: argparse takes abbreviations, which a new flag can make ambiguous
    assert flags <= opts, f"{cmd}: {sorted(flags - opts)} are not options of service.tune (it has {sorted(opts)})"
    try:
        return parser.parse_args(cmd.args)
    except SystemExit as exc:
        raise AssertionError(f"{cmd}: service.tune rejects it: {capsys.readouterr().err.strip()}") from exc


def in_repo(path: Path) -> Path:
    """A path as the image sees it (absolute under WORKDIR, or relative to it) -> the same file in this checkout."""
    if path.is_absolute():
        base = Path(workdir())
        assert path.is_relative_to(base), f"{path}: not in the image's WORKDIR {base}"
        return REPO / path.relative_to(base)
    return REPO / path


def space_file(args: Any) -> Path:
    """The space file a parsed service.tune command runs, in this checkout."""
    return in_repo(args.space) if args.space is not None else Path(tune.DEFAULT_SPACE)


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---- the tests --------------------------------------------------------------------------------------------------


def test_every_yaml_file_parses():
    paths = yaml_files()
    assert {COMPOSE, CLUSTER, RAYJOB} <= set(paths)
    for path in paths:
        docs = load_yaml(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{rel(path)}: not a YAML mapping"


def test_each_file_holds_its_commands():
    """The other tests check every command found: make sure the commands are found at all."""
    expected = [
        (DOCKERFILE, "service.tune", 1),
        (DOCKERFILE, "ray start", 2),
        (COMPOSE, "service.tune", 1),
        (COMPOSE, "ray start", 3),
        (COMPOSE, "mlflow server", 1),
        (CLUSTER, "service.tune", 1),
        (CLUSTER, "ray start", 2),
        (CLUSTER, "ray up", 1),
        (RAYJOB, "service.tune", 1),
        (README, "service.tune", 3),
        (ROOT_README, "service.tune", 2),
        (ROOT_README, "ray start", 2),
        (ROOT_README, "ray up", 1),
    ]
    for path, kind, least in expected:
        found = commands_in(path, kind)
        assert len(found) >= least, f"{rel(path)}: {len(found)} `{kind}` command(s), expected {least} or more"


def test_service_tune_commands_parse_and_load_their_space(capsys):
    found = [c for c in commands() if c.kind == "service.tune"]
    assert found
    for cmd in found:
        args = tune_args(cmd, capsys)
        argv = list(cmd.args)
        if args.space is not None:  # else the service's default, search_spaces/quickstart.yaml
            space = in_repo(args.space)
            assert space.is_file(), f"{cmd}: --space {args.space}: no {rel(space)} in the repository"
            assert space.parent == REPO / "search_spaces", f"{cmd}: --space outside search_spaces/"
            argv[argv.index("--space") + 1] = str(space)
        # the service's own dry run: the space file loads with these --set overrides and options
        capsys.readouterr()
        status = tune.main([*argv, "--dry-run"])
        output = capsys.readouterr()
        assert status == 0, f"{cmd}: the dry run fails:\n{output.err}{output.out[-2000:]}"


def test_ray_commands_parse_with_rays_cli():
    found = [c for c in commands() if c.kind.startswith("ray ")]
    assert any(c.kind == "ray start" for c in found)
    for cmd in found:
        params = click_parse(cmd)
        config = params.get("cluster_config_file")
        if config:
            assert (REPO / config).is_file(), f"{cmd}: no {config}"


def test_ray_start_flags_are_rays():
    """Every --flag of every `ray start` (compose, launcher, Dockerfile, README) is an option of Ray's `start`."""
    from ray.scripts.scripts import start

    opts = {o for p in start.params for o in p.opts}
    starts = [c for c in commands() if c.kind == "ray start"]
    assert len(starts) >= 7
    for cmd in starts:
        flags = [a.split("=", 1)[0] for a in cmd.args if a.startswith("--")]
        assert flags, f"{cmd}: no flags"
        assert set(flags) <= opts, f"{cmd}: {sorted(set(flags) - opts)} are not options of `ray start`"


def test_mlflow_server_commands_parse_with_mlflows_cli():
    opts = {o for p in mlflow_server().params for o in p.opts}
    found = [c for c in commands() if c.kind == "mlflow server"]
    assert found
    for cmd in found:
        flags = {a.split("=", 1)[0] for a in cmd.args if a.startswith("--")}
        assert flags <= opts, f"{cmd}: {sorted(flags - opts)} are not options of `mlflow server`"
        click_parse(cmd)


# ---- versions and images ----------------------------------------------------------------------------------------


def deployment_texts() -> dict[str, str]:
    paths = [DOCKERFILE, README, *yaml_files()]
    return {rel(p): p.read_text() for p in paths}


def test_version_pins_match_constraints():
    pinned = pins()
    texts = deployment_texts()
    checked = 0
    for name, text in texts.items():
        for m in re.finditer(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", text):
            assert m[1] == pinned["ray"], f"{name}: {m[0]} but constraints.txt pins ray=={pinned['ray']}"
            checked += 1
        for m in re.finditer(r"\b([A-Za-z][A-Za-z0-9_.-]*)(\[[^\]]*\])?==([0-9][A-Za-z0-9.+!-]*)", text):
            package = canonical(m[1])
            if package in pinned:
                assert m[3] == pinned[package], f"{name}: {m[0]} but constraints.txt pins {package}=={pinned[package]}"
                checked += 1
        for m in re.finditer(r"\brayVersion:\s*['\"]?([^'\"\s#]+)", text):
            assert m[1] == pinned["ray"], f"{name}: rayVersion {m[1]} but constraints.txt pins ray=={pinned['ray']}"
            checked += 1
    ray_version = one_doc(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"]
    assert isinstance(ray_version, str) and ray_version == pinned["ray"], f"rayVersion {ray_version!r}"
    assert checked >= 1


def images() -> list[tuple[str, str]]:
    """(where, image) of every container image the YAML files name."""
    found = []
    for path in yaml_files():
        for doc in load_yaml(path):
            for where, value in walk(doc):
                if where.split(".")[-1] == "image" and isinstance(value, str):
                    found.append((f"{rel(path)}: {where}", interpolate(value)))
    return found


def test_images_are_pinned_and_the_project_image_is_one():
    found = images()
    assert found
    project_tags = set()
    for where, image in found:
        assert "@sha256:" in image or re.search(r":[^/:]+$", image), f"{where}: {image} has no tag"
        tag = image.rsplit(":", 1)[-1]
        assert tag != "latest" and re.search(r"\d", tag), f"{where}: {image}: pin a version, not {tag!r}"
        name = image.split("@")[0].rsplit(":", 1)[0]
        if name.split("/")[-1] == PROJECT_IMAGE:
            project_tags.add(tag)
    assert len(project_tags) == 1, f"the project image ({PROJECT_IMAGE}) has tags {sorted(project_tags)}"
    by_service = {s: svc.get("image", "") for s, svc in one_doc(COMPOSE)["services"].items()}
    assert re.fullmatch(r"postgres:16\.\d+(-\w+)?", by_service["postgres"]), by_service["postgres"]
    for service in ("s3", "create-bucket"):
        assert re.search(r"/minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT", by_service[service]), by_service[service]


# ---- Dockerfile -------------------------------------------------------------------------------------------------


def test_dockerfile_base_image_is_a_pinned_python_311_slim():
    froms = instructions("FROM")
    assert len(froms) == 1, "one stage: the same image for the driver, the head and the workers"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", froms[0].value.split()[0]), froms[0].value


def test_dockerfile_copies_the_project_and_installs_it_with_the_constraints():
    assert workdir() == "/app"
    copied: dict[str, int] = {}
    for ins in instructions("COPY"):
        words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
        for src in words[:-1]:
            copied[src.rstrip("/")] = ins.line
    needed = ["constraints.txt", "pyproject.toml", "README.md", "trainables", "service", "search_spaces"]
    for src in needed:
        assert src in copied, f"docker/Dockerfile copies no {src}"
        assert (REPO / src).exists(), f"docker/Dockerfile copies {src}, which the repository lacks"
    installs = []
    for ins in instructions("RUN"):
        words = shlex.split(ins.value)
        for i in range(len(words) - 1):
            if words[i : i + 2] == ["pip", "install"] or words[i : i + 3] == ["python", "-m", "pip"]:
                end = next((j for j in range(i, len(words)) if words[j] in OPERATORS), len(words))
                installs.append((ins.line, words[i:end]))
    assert installs, "docker/Dockerfile installs nothing with pip"
    for line, words in installs:
        pairs = list(zip(words, words[1:], strict=False))
        assert ("-c", "constraints.txt") in pairs, f"Dockerfile:{line}: {shlex.join(words)} without -c constraints.txt"
        assert line > copied["constraints.txt"], f"Dockerfile:{line}: pip runs before constraints.txt is copied"
    project = [w for line, words in installs for w in words if re.fullmatch(r"\.?\[([a-z,]+)\]|\.\[.*\]", w)]
    assert any("cluster" in w for w in project), "docker/Dockerfile does not install the project's [cluster] extra"


def test_dockerfile_has_what_the_cluster_launcher_and_kuberay_run():
    packages: set[str] = set()
    for ins in instructions("RUN"):
        words = shlex.split(ins.value)
        if "install" in words and "apt-get" in words:
            packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    # rsync: the launcher copies file mounts into the container; openssh-client: the head's autoscaler reaches the
    # workers; wget: KubeRay's health probes
    missing = {"rsync", "openssh-client", "wget"} - packages
    assert not missing, f"docker/Dockerfile does not install {sorted(missing)}"


# ---- compose ----------------------------------------------------------------------------------------------------


def services() -> dict[str, dict[str, Any]]:
    return one_doc(COMPOSE)["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_has_the_stack():
    found = services()
    needed = {"postgres", "s3", "create-bucket", "mlflow", "ray-head", "ray-worker", "sweep"}
    assert needed <= set(found), f"docker/compose.yaml lacks {sorted(needed - set(found))}"
    assert found["sweep"].get("profiles") == ["sweep"]
    for name in ("mlflow", "ray-head", "ray-worker", "sweep"):
        assert found[name]["image"].split("/")[-1].startswith(PROJECT_IMAGE + ":"), f"{name}: not the project image"
        assert found[name].get("build", {}).get("dockerfile") == "docker/Dockerfile", f"{name}: not built here"
        context = (COMPOSE.parent / found[name]["build"]["context"]).resolve()
        assert context == REPO, f"{name}: the build context is {context}, not the repository"
    sweep_needs = set(found["sweep"].get("depends_on", {}))
    assert {"mlflow", "ray-head", "postgres", "create-bucket"} <= sweep_needs, sweep_needs


def test_compose_publishes_ports_on_localhost_only():
    published = 0
    for name, service in services().items():
        assert service.get("network_mode") != "host", f"{name}: network_mode host publishes every port"
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1" and port.get("published"), f"{name}: {port}"
            else:
                port = interpolate(str(port))
                assert re.fullmatch(r"127\.0\.0\.1:\d+(-\d+)?:\d+(-\d+)?(/(tcp|udp))?", port), (
                    f"{name}: port {port!r} is not bound to 127.0.0.1 (write 127.0.0.1:HOST:CONTAINER)"
                )
            published += 1
    assert published >= 1


def test_compose_ray_cluster_uses_port_6380_consistently():
    found = services()
    starts = {
        c.where.split(": services.")[1].split(".")[0]: click_parse(c)
        for c in commands_in(COMPOSE, "ray start")
        if ": services." in c.where
    }
    assert set(RAY_NODES) <= set(starts), sorted(starts)
    head = starts["ray-head"]
    assert head["head"] and head["port"] not in (None, 6379), f"ray-head: --port {head['port']}"
    for name, params in starts.items():
        if name == "ray-head":
            continue
        host, port = host_port(params["address"])
        assert (host, port) == ("ray-head", head["port"]), f"{name}: --address {params['address']}"
    for cmd in commands_in(COMPOSE, "service.tune"):
        address = tune.parser().parse_args(cmd.args).address
        assert host_port(address) == ("ray-head", head["port"]), f"{cmd}: --address {address}"
    for name, service in found.items():
        for port in service.get("ports", []):
            assert "6379" not in str(port), f"{name}: port {port}"
    for name in RAY_NODES:  # every node and the driver share the cluster's token
        env = environment(found[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE {env.get('RAY_AUTH_MODE')}"
        assert env.get("RAY_AUTH_TOKEN") == environment(found["ray-head"])["RAY_AUTH_TOKEN"], name


def test_compose_stores_exist_and_are_reachable():
    found = services()
    text = COMPOSE.read_text()
    # S3: every bucket the stack writes to is the one create-bucket makes; every Ray node and the driver reach it
    maker = " ".join(str(x) for x in (found["create-bucket"].get("command") or []))
    buckets = set(re.findall(r"\bmc mb\b[^&;]*?\blocal/([a-z0-9.-]+)", maker))
    assert buckets, "create-bucket makes no bucket"
    used = set(re.findall(r"\bs3://([a-z0-9.-]+)", text))
    assert used and used <= buckets, f"s3 buckets used {sorted(used)}, made {sorted(buckets)}"
    for name in RAY_NODES:
        endpoint = environment(found[name]).get("AWS_ENDPOINT_URL", "")
        assert urlsplit(endpoint).hostname == "s3", f"{name}: AWS_ENDPOINT_URL {endpoint!r} is not the s3 service"
    assert urlsplit(environment(found["mlflow"]).get("MLFLOW_S3_ENDPOINT_URL", "")).hostname == "s3"
    # PostgreSQL: every database a URL names is made by the init script (or is POSTGRES_DB)
    mounts = [interpolate(str(v)) for v in found["postgres"].get("volumes", [])]
    init = [m.split(":")[0] for m in mounts if ":/docker-entrypoint-initdb.d" in m]
    assert init, "postgres: nothing mounted on /docker-entrypoint-initdb.d"
    scripts = [p for p in sorted((COMPOSE.parent / init[0]).glob("*.sql"))]
    assert scripts, f"postgres: no *.sql in {init[0]}"
    made = {environment(found["postgres"]).get("POSTGRES_DB", "")}
    for script in scripts:
        made |= set(re.findall(r"(?i)\bCREATE DATABASE\s+\"?(\w+)", script.read_text()))
    assert {"mlflow", "optuna"} <= made, sorted(made)
    for m in re.finditer(r"postgresql(?:\+\w+)?://[^@\s]*@([\w.-]+):\d+/(\w+)", text):
        assert m[1] in found and m[2] in made, f"{m[0]}: no service {m[1]} or no database {m[2]}"


def test_compose_mlflow_server_serves_the_driver():
    (cmd,) = commands_in(COMPOSE, "mlflow server")
    params = click_parse(cmd)
    assert params["backend_store_uri"].startswith("postgresql+psycopg://"), params["backend_store_uri"]
    assert params["artifacts_destination"].startswith("s3://"), params["artifacts_destination"]
    assert params["host"] == "0.0.0.0"
    allowed = (params.get("allowed_hosts") or "").split(",")
    for tune_cmd in commands_in(COMPOSE, "service.tune"):
        uri = urlsplit(tune.parser().parse_args(tune_cmd.args).tracking_uri)
        assert uri.hostname == "mlflow" and uri.port == params["port"], f"{tune_cmd}: tracking URI {uri.geturl()}"
        # MLflow answers only the Host headers it allows (localhost and private IPs unless --allowed-hosts)
        assert uri.netloc in allowed, f"{tune_cmd}: MLflow's --allowed-hosts {allowed} refuses {uri.netloc}"


def resources(space: Path) -> dict[str, float]:
    data = yaml.safe_load(space.read_text())
    return {k: float(v) for k, v in (data.get("resources") or {}).items() if k in ("cpu", "gpu")}


def test_compose_worker_holds_a_quickstart_trial():
    (cmd,) = [c for c in commands_in(COMPOSE, "ray start") if ".ray-worker." in c.where]
    cpus = click_parse(cmd)["num_cpus"]
    for tune_cmd in commands_in(COMPOSE, "service.tune"):
        need = resources(space_file(tune.parser().parse_args(tune_cmd.args)))
        assert cpus is None or need.get("cpu", 1) <= cpus, f"{tune_cmd}: a trial needs {need}, the worker has {cpus}"
        assert need.get("gpu", 0) == 0, f"{tune_cmd}: GPU trials, but the compose worker has no GPU"


# ---- Ray cluster launcher ---------------------------------------------------------------------------------------


def test_ray_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = one_doc(CLUSTER)
    validate_config(prepare_config(config))  # what `ray up` does before it calls the cloud
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].split("/")[-1].startswith(PROJECT_IMAGE + ":")
    gpu_types = [
        name
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"] and re.match(r"(g|p)\d", node["node_config"]["InstanceType"])
    ]
    assert gpu_types, "no GPU worker node type"
    for remote, local in config.get("file_mounts", {}).items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: no {local} in the repository"


def test_ray_cluster_setup_installs_with_the_constraints():
    config = one_doc(CLUSTER)
    setup = [*config.get("setup_commands", []), *config.get("worker_setup_commands", [])]

    def constrained(words: list[str]) -> bool:
        pairs = zip(words, words[1:], strict=False)
        return (
            "pip" in words and "install" in words and any(a == "-c" and b.endswith("constraints.txt") for a, b in pairs)
        )

    assert any(constrained(shlex.split(c)) for c in setup), f"setup_commands without -c constraints.txt: {setup}"


def test_ray_cluster_start_commands_form_one_cluster():
    config = one_doc(CLUSTER)

    def starts(key: str) -> list[dict[str, Any]]:
        found = [c for c in commands_in(CLUSTER, "ray start") if f": {key}" in c.where]
        assert found, f"no ray start in {key}"
        return [click_parse(c) for c in found]

    (head,) = starts("head_start_ray_commands")
    (worker,) = starts("worker_start_ray_commands")
    assert head["head"] and head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert host_port(worker["address"]) == ("$RAY_HEAD_IP", head["port"]), worker["address"]
    submits = [
        c
        for c in commands_in(CLUSTER, "service.tune")
        if c.where.endswith("comment") and tune.parser().parse_args(c.args).address == "auto"
    ]
    assert submits, "no comment shows how to run the sweep on the cluster (ray exec ... --address auto)"
    assert config["cluster_name"]


# ---- KubeRay ----------------------------------------------------------------------------------------------------


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_runs_the_sweep_on_a_gpu_cluster(capsys):
    job = one_doc(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    (cmd,) = commands_in(RAYJOB, "service.tune")
    assert cmd.where.endswith("spec.entrypoint")
    args = tune_args(cmd, capsys)
    assert args.address == "auto"
    assert any(s.startswith("storage.path=s3://") for s in args.set), "Tune's state must outlive the Ray cluster"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    from ray.scripts.scripts import start

    opts = {o for p in start.params for o in p.opts}
    for group in [head, *workers]:
        params = group.get("rayStartParams") or {}
        flags = [f"--{k}" for k in params]
        assert set(flags) <= opts, f"rayStartParams {sorted(set(flags) - opts)} are not `ray start` options"
        start.make_context("start", [f"--{k}={v}" for k, v in params.items()])
    need = resources(space_file(args))
    gpu_groups = 0
    for group in workers:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        gpu_groups += gpus >= 1
        if gpus:
            assert need.get("cpu", 1) <= cpu_quantity(limits["cpu"]), f"{group['groupName']}: too few CPUs"
            assert need.get("gpu", 0) <= gpus
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"


def test_rayjob_images_and_credentials():
    cluster = one_doc(RAYJOB)["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    pods = [("head", head)] + [
        (g["groupName"], g["template"]["spec"]["containers"]) for g in cluster["workerGroupSpecs"]
    ]
    entry = one_doc(RAYJOB)["spec"]["entrypoint"]
    for name, containers in pods:
        for container in containers:
            assert container["image"].split("/")[-1].startswith(PROJECT_IMAGE + ":"), f"{name}: {container['image']}"
            env = {e["name"]: e for e in container.get("env", [])}
            needed = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            if name == "head" and "storage.optuna=postgresql" in entry:
                needed.add("PGPASSWORD")
            assert needed <= set(env), f"{name}: no {sorted(needed - set(env))}"
            for var in needed:
                ref = env[var].get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") and ref.get("key") and "value" not in env[var], f"{name}: {var}"


# ---- credentials ------------------------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(?i)(password|secret|token|passwd|access_key|api_key|private_key)")
INTERPOLATED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}")


def secret_like(name: str) -> bool:
    """A variable or key that holds a credential (not its mode, path or file name)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):  # a path, a URL, a sentence
        return False
    return bool(SECRET_NAME.search(name)) and not name.upper().endswith(("_MODE", "_PATH", "_FILE", "_URL"))


def test_no_credentials_are_written_down():
    problems = []
    for path in yaml_files():
        for doc in load_yaml(path):
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, list):
                    stack += node
                    continue
                if not isinstance(node, dict):
                    continue
                stack += node.values()
                # Kubernetes env entries: {name: X, value: literal} for a secret-like X
                if secret_like(str(node.get("name", ""))) and "value" in node:
                    problems.append(f"{rel(path)}: {node['name']} has a literal value (use valueFrom.secretKeyRef)")
                for key, value in node.items():
                    if secret_like(str(key)) and isinstance(value, str | int | float):
                        if not INTERPOLATED.fullmatch(str(value)):
                            problems.append(f"{rel(path)}: {key}: {value!r} (use ${{VAR}} or ${{VAR:-dev-default}})")
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                problems.append(f"{rel(path)}: a Secret with its data in the repository")
    for name, text in deployment_texts().items():
        for m in re.finditer(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:'\"]*:([^@/\s'\"]+)@", text):
            if not m[1].startswith("$"):
                problems.append(f"{name}: a password in a URL: {m[0]}")
        for m in re.finditer(r"\b([A-Z][A-Z0-9_]*)=([^\s'\"]*)", text):
            if secret_like(m[1]) and m[2] not in ("", "...") and not m[2].startswith("$"):
                problems.append(f"{name}: {m[0]}")
        for pattern in (r"\bAKIA[0-9A-Z]{16}\b", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"\b[0-9a-f]{32,}\b"):
            problems += [f"{name}: {m[0]}" for m in re.finditer(pattern, text)]
    assert not problems, "credentials written down:\n" + "\n".join(problems)
