"""Team services: a project-local PostgreSQL, an MLflow tracking server (basic auth, served artifacts) and a Prefect
server on it. `braintumor services up | down | status`; params: `services`.

The embedded stores (`sqlite:///mlflow/mlflow.db`, Prefect's ephemeral server) stay the zero-set-up default; these
servers are for a team sharing one tracking server and one orchestrator.

Credentials come only from the environment and reach the servers through theirs: never a command line (which
`ps` shows every user), a params file, a log or a file of ours.

- `MLFLOW_AUTH_ADMIN_PASSWORD` (12 or more characters): the MLflow admin's password, stored (hashed) when the
  user store is created on the first `up`;
- `MLFLOW_FLASK_SERVER_SECRET_KEY`: the basic-auth app's static CSRF/session key;
- `PREFECT_SERVER_API_AUTH_STRING`: what every Prefect client must send (as its `PREFECT_API_AUTH_STRING`).

The PostgreSQL role the servers use gets a random password at the first `up`, kept in `<dir>/postgres.secret`
(mode 0600) and handed to the servers as `PGPASSWORD`, so no connection URI carries it. The cluster listens on
127.0.0.1 only, with scram-sha-256; its superuser is reachable only through a Unix socket inside the data folder.
PostgreSQL refuses to run as root: when `up` runs as root, the cluster runs as `services.postgres.run_as`.
"""

from __future__ import annotations

import base64
import configparser
import functools
import grp
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from components.config import Params, ProjectError, ServicesParams

logger = logging.getLogger(__name__)

ROLE = "braintumor"  # the PostgreSQL role MLflow, its auth app and Prefect connect as; owner of their databases
DATABASES = {"mlflow": "mlflow", "auth": "mlflow_auth", "prefect": "prefect"}
SUPERUSER = "postgres"
MIN_ADMIN_PASSWORD = 12  # MLflow >= 3.16.1 refuses a shorter admin password
UP = "run `braintumor services up`"
NAMES = {"postgres": "PostgreSQL", "mlflow": "MLflow server", "prefect": "Prefect server"}
MARKERS = {"mlflow": ("mlflow", "server"), "prefect": ("prefect", "server")}  # expected in a live pid's cmdline
SECRET_ENV = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_SERVER_API_AUTH_STRING")


class ServiceError(ProjectError):
    """A service cannot be started, reached or stopped; the message names it, its log and the fix."""


@dataclass(frozen=True)
class Layout:
    """Where everything of `services.dir` lives (absolute paths)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "postgres"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def secret(self) -> Path:
        return self.root / "postgres.secret"

    @property
    def auth_config(self) -> Path:
        return self.root / "mlflow" / "basic_auth.ini"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def pid(self, service: str) -> Path:
        return self.run / f"{service}.pid"


def layout(services: ServicesParams) -> Layout:
    return Layout(Path(services.dir).resolve())


# ----------------------------------------------------------------------------------------------------- environment

@dataclass(frozen=True)
class Secrets:
    admin_username: str
    admin_password: str
    flask_secret_key: str
    prefect_auth_string: str


def read_secrets(services: ServicesParams) -> Secrets:
    """The credentials `up` needs, from the environment only; a clear error for each one missing or too weak."""
    problems = []
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        problems.append("MLFLOW_AUTH_ADMIN_PASSWORD is not set: export the MLflow admin's password (12 or more "
                        "characters), e.g. from your secret store; it never goes into a file of the project")
    elif len(password) < MIN_ADMIN_PASSWORD:
        problems.append(f"MLFLOW_AUTH_ADMIN_PASSWORD has {len(password)} characters: MLflow (>= 3.16.1) refuses an "
                        f"admin password shorter than {MIN_ADMIN_PASSWORD}; export a longer one")
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        problems.append("MLFLOW_FLASK_SERVER_SECRET_KEY is not set: export a random key for the auth app's CSRF "
                        "protection, e.g. `export MLFLOW_FLASK_SERVER_SECRET_KEY=$(openssl rand -hex 32)`")
    if not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        problems.append("PREFECT_SERVER_API_AUTH_STRING is not set: export the string every Prefect client must "
                        "send, e.g. `export PREFECT_SERVER_API_AUTH_STRING=\"team:$(openssl rand -hex 16)\"`")
    if problems:
        raise ServiceError("cannot start the team services:\n  - " + "\n  - ".join(problems))
    return Secrets(admin_username=_admin_username(services), admin_password=password,
                   flask_secret_key=os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                   prefect_auth_string=os.environ["PREFECT_SERVER_API_AUTH_STRING"])


def _admin_username(services: ServicesParams) -> str:
    if os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME"):
        return os.environ["MLFLOW_AUTH_ADMIN_USERNAME"]
    config = configparser.ConfigParser()
    config.read(services.mlflow.auth_config)
    return config.get("mlflow", "admin_username", fallback="admin")


def _server_env(drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment minus client credentials a server has no use for."""
    drop = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD",
            "PGPASSFILE", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", *drop_prefixes)
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# ------------------------------------------------------------------------------------------------------ addresses

def _probe_host(host: str) -> str:
    """Where this machine reaches a server bound to `host`."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _public_host(host: str) -> str:
    """How others name a server bound to `host` (the machine's name when it listens on every interface)."""
    return socket.getfqdn() if host in ("", "0.0.0.0", "::") else _probe_host(host)


def mlflow_url(services: ServicesParams, public: bool = False) -> str:
    host = (_public_host if public else _probe_host)(services.mlflow.host)
    return f"http://{host}:{services.mlflow.port}"


def prefect_url(services: ServicesParams, public: bool = False) -> str:
    host = (_public_host if public else _probe_host)(services.prefect.host)
    return f"http://{host}:{services.prefect.port}/api"


def database_uri(services: ServicesParams, database: str, driver: str) -> str:
    """A connection URI without password (the servers get it as PGPASSWORD). The driver is explicit: SQLAlchemy
    2.1's default for postgresql:// is psycopg 3; MLflow's stores use psycopg2, Prefect asyncpg."""
    scheme = f"postgresql+{driver}"
    return f"{scheme}://{ROLE}@127.0.0.1:{services.postgres.port}/{DATABASES[database]}"


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def _get(url: str, auth: str | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


# ----------------------------------------------------------------------------------------------------- processes

def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own exited child (only when `up` and `down` run in one Python process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _process_state(pgid) != "Z" or _other_members(pgid)


def _process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _other_members(pgid: int) -> bool:
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and int(stat_file.parent.name) != pgid and fields[0] != "Z":
            return True
    return False


def _running(layout_: Layout, service: str) -> int | None:
    """The pid (= process group) of our running `service`, or None; a stale pid file is removed."""
    pid_file = layout_.pid(service)
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmdline = None
    leader_is_ours = cmdline is not None and all(m in cmdline for m in MARKERS[service])
    # The leader may be gone while its workers live on; a pid that now belongs to another program is not ours.
    if (leader_is_ours or cmdline is None or not cmdline.strip()) and _group_alive(pid):
        return pid
    pid_file.unlink(missing_ok=True)
    return None


def _spawn(layout_: Layout, service: str, command: list[str], env: dict[str, str]) -> int:
    log = layout_.log(service)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} braintumor services up: {command[0]} "
                     f"{' '.join(command[1:3])} =====\n")
        handle.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                   env=env, cwd=layout_.root, start_new_session=True)
    layout_.pid(service).write_text(f"{process.pid}\n")
    logger.info("%s started (pid %d), log %s", NAMES[service], process.pid, log)
    return process.pid


def _stop_group(layout_: Layout, service: str, timeout: float) -> str:
    pid = _running(layout_, service)
    if pid is None:
        layout_.pid(service).unlink(missing_ok=True)
        return "not running"
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _group_alive(pid):
        if time.monotonic() > deadline:
            logger.warning("%s did not stop within %s s: killing it", NAMES[service], timeout)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while _group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            break
        time.sleep(0.2)
    layout_.pid(service).unlink(missing_ok=True)
    return "stopped"


def _executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found beside {sys.executable} or on PATH: install the project "
                           "(`python3 -m uv sync --frozen --extra dev`) and activate its environment")
    return found


# ---------------------------------------------------------------------------------------------------- PostgreSQL

def _pg_bin(services: ServicesParams) -> Path:
    configured = services.postgres.bin_dir
    if configured != "auto":
        candidates = [Path(configured)]
    else:
        on_path = shutil.which("pg_ctl")
        debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
        candidates = ([Path(on_path).parent] if on_path else []) + debian
    for folder in candidates:
        if all((folder / tool).exists() for tool in ("initdb", "pg_ctl", "psql")):
            return folder
    raise ServiceError(f"PostgreSQL: initdb, pg_ctl and psql not found in {', '.join(map(str, candidates)) or 'PATH'}"
                       ": install PostgreSQL (`apt-get install postgresql`) or set services.postgres.bin_dir")


def _pg_account(services: ServicesParams) -> pwd.struct_passwd | None:
    """The system user the cluster runs as when we are root; None when we run it as ourselves."""
    if os.geteuid() != 0:
        return None
    name = services.postgres.run_as
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"PostgreSQL refuses to run as root and services.postgres.run_as user {name!r} does not "
                           f"exist: create it (`useradd --system --no-create-home {name}`) or name another "
                           "unprivileged user") from None
    if account.pw_uid == 0:
        raise ServiceError(f"PostgreSQL refuses to run as root: services.postgres.run_as ({name!r}) must name an "
                           "unprivileged user, e.g. postgres")
    return account


def _as_pg(services: ServicesParams, command: list[str]) -> list[str]:
    account = _pg_account(services)
    if account is None:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", account.pw_name, "--", *command]
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups", *command]


def _pg_env() -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TZ")
    return {k: v for k, v in os.environ.items() if k in keep} | {"PGTZ": "UTC"}


def _pg_run(services: ServicesParams, command: list[str], log: Path, what: str, stdin: str | None = None,
            timeout: float | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(_as_pg(services, command), input=stdin, capture_output=True, text=True, cwd="/",
                          env=_pg_env(), timeout=timeout)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise ServiceError(f"PostgreSQL: {what} failed (exit {done.returncode}): {output}\n  log: {log}\n"
                           f"{_tail(log)}\n  fix the cause above, then {UP} again")
    return done


def _can_search(path: Path, account: pwd.struct_passwd) -> bool:
    info = path.stat()
    groups = {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem} | {account.pw_gid}
    if info.st_uid == account.pw_uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _grant_traverse(services: ServicesParams, root: Path) -> None:
    """Let the cluster's user reach `root`: search permission (never listing) on every folder above it."""
    account = _pg_account(services)
    if account is None:
        return
    for folder in [root, *root.parents]:
        if _can_search(folder, account):
            continue
        if shutil.which("setfacl"):
            subprocess.run(["setfacl", "-m", f"u:{account.pw_name}:x", str(folder)], check=True)
            how = f"ACL u:{account.pw_name}:x"
        else:
            folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
            how = "o+x"
        logger.warning("PostgreSQL runs as %r, which could not traverse %s: granted search permission (%s, no "
                       "listing)", account.pw_name, folder, how)
    probe = subprocess.run(_as_pg(services, ["test", "-x", str(root)]), capture_output=True, cwd="/")
    if probe.returncode != 0:
        raise ServiceError(f"PostgreSQL: user {account.pw_name!r} cannot reach {root}: give it search permission "
                           f"on every folder above (`chmod o+x` or `setfacl -m u:{account.pw_name}:x`), or set "
                           "services.dir to a folder it can reach")


def _pg_status(services: ServicesParams, layout_: Layout) -> dict | None:
    """{'pid', 'port'} of the running cluster, or None. Read from postmaster.pid as ourselves (root, or the owner),
    as `pg_ctl status` does, so that it works even when the cluster's user has lost its way to the folder."""
    try:
        lines = (layout_.data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if _process_state(pid) == "Z":
        return None
    try:
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None  # a stale pid file whose pid now belongs to another program
    except OSError:
        pass
    return {"pid": pid, "port": port}


def _role_password(layout_: Layout) -> str:
    if layout_.secret.exists():
        return layout_.secret.read_text().strip()
    password = secrets.token_urlsafe(32)
    fd = os.open(layout_.secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _postgres_up(services: ServicesParams, layout_: Layout) -> str:
    pg = services.postgres
    bin_dir = _pg_bin(services)
    account = _pg_account(services)
    log = layout_.log("postgres")
    running = _pg_status(services, layout_)
    if running:
        if running["port"] not in (None, pg.port):
            raise ServiceError(f"PostgreSQL runs on port {running['port']} but services.postgres.port is {pg.port}: "
                               "run `braintumor services down`, then `braintumor services up`")
        logger.info("PostgreSQL already running (pid %s, 127.0.0.1:%d)", running["pid"], pg.port)
        _ensure_databases(services, layout_)
        return "already running"
    socket_path = f"{layout_.data}/.s.PGSQL.{pg.port}"
    if len(socket_path.encode()) > 107:
        raise ServiceError(f"PostgreSQL: the socket path {socket_path} is longer than Unix allows (107 bytes): set "
                           "services.dir to a shorter folder")
    if not _port_free("127.0.0.1", pg.port):
        raise ServiceError(f"PostgreSQL: port {pg.port} on 127.0.0.1 is in use by another program: stop it, or "
                           f"choose another port (-S services.postgres.port=N or params.yaml)")
    if not log.exists():
        log.touch(mode=0o600)
    if account is not None:
        os.chown(log, account.pw_uid, account.pw_gid)
    if not (layout_.data / "PG_VERSION").exists():
        if layout_.data.exists() and any(layout_.data.iterdir()):
            raise ServiceError(f"PostgreSQL: {layout_.data} is not empty but holds no cluster (no PG_VERSION): move "
                               f"it away, then {UP} again")
        layout_.data.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(layout_.data, account.pw_uid, account.pw_gid)
        logger.info("PostgreSQL: initdb %s", layout_.data)
        _pg_run(services, [str(bin_dir / "initdb"), "-D", str(layout_.data), "-U", SUPERUSER, "-E", "UTF8",
                           "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256"], log, "initdb")
        with (layout_.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# Written by `braintumor services up` at every start (port, addresses).\n"
                       "include_if_exists = 'braintumor.conf'\n")
    elif account is not None and layout_.data.stat().st_uid != account.pw_uid:
        raise ServiceError(f"PostgreSQL: {layout_.data} is owned by uid {layout_.data.stat().st_uid}, not by "
                           f"{account.pw_name!r} who runs the cluster: `chown -R {account.pw_name}: {layout_.data}`")
    conf = layout_.data / "braintumor.conf"
    conf.write_text("# braintumor services up: rewritten at every start from params.yaml (services.postgres)\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {pg.port}\n"
                    # the superuser's only way in: a socket inside the data folder (mode 0700)
                    f"unix_socket_directories = {_conf_quote(str(layout_.data))}\n"
                    "password_encryption = 'scram-sha-256'\n")
    if account is not None:
        os.chown(conf, account.pw_uid, account.pw_gid)
    logger.info("PostgreSQL: starting on 127.0.0.1:%d", pg.port)
    _pg_run(services, [str(bin_dir / "pg_ctl"), "start", "-D", str(layout_.data), "-l", str(log), "-w", "-t",
                       str(int(services.startup_timeout))], log, "pg_ctl start",
            timeout=services.startup_timeout + 30)
    _ensure_databases(services, layout_)
    return "started"


def _psql(services: ServicesParams, layout_: Layout, sql: str, what: str) -> str:
    command = [str(_pg_bin(services) / "psql"), "-h", str(layout_.data), "-p", str(services.postgres.port),
               "-U", SUPERUSER, "-d", "postgres", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-f", "-"]
    return _pg_run(services, command, layout_.log("postgres"), what, stdin=sql).stdout


def _ensure_databases(services: ServicesParams, layout_: Layout) -> None:
    """The role and the three databases; the role's password is (re)set from the secret file through stdin."""
    password = _role_password(layout_)
    _psql(services, layout_,
          f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN "
          f"CREATE ROLE {ROLE} LOGIN; END IF; END$$;\n"
          f"ALTER ROLE {ROLE} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {_conf_quote(password)};\n",
          "creating the role")
    existing = set(_psql(services, layout_, "SELECT datname FROM pg_database;\n", "listing databases").split())
    for name in DATABASES.values():
        if name not in existing:
            logger.info("PostgreSQL: creating database %s", name)
            _psql(services, layout_, f"CREATE DATABASE {name} OWNER {ROLE};\n", f"creating database {name}")


def _postgres_down(services: ServicesParams, layout_: Layout) -> str:
    if _pg_status(services, layout_) is None:
        return "not running"
    _grant_traverse(services, layout_.root)  # pg_ctl runs as the cluster's user, who must reach the data folder
    _pg_run(services, [str(_pg_bin(services) / "pg_ctl"), "stop", "-D", str(layout_.data), "-m", "fast", "-w",
                       "-t", str(int(services.stop_timeout))], layout_.log("postgres"), "pg_ctl stop",
            timeout=services.stop_timeout + 30)
    return "stopped"


# -------------------------------------------------------------------------------------------------------- MLflow

def write_auth_config(services: ServicesParams, layout_: Layout) -> Path:
    """The basic-auth config the server reads: the template with database_uri on PostgreSQL."""
    template = Path(services.mlflow.auth_config)
    config = configparser.ConfigParser()
    if not config.read(template) or not config.has_section("mlflow"):
        raise ServiceError(f"MLflow server: auth config template {template} is missing or has no [mlflow] section: "
                           "restore it (`git checkout mlflow/basic_auth.ini`) or set services.mlflow.auth_config")
    if config.has_option("mlflow", "admin_password"):
        raise ServiceError(f"MLflow server: {template} sets admin_password: remove it; the admin password comes only "
                           "from MLFLOW_AUTH_ADMIN_PASSWORD")
    config.set("mlflow", "database_uri", database_uri(services, "auth", driver="psycopg2"))
    # MLflow hashes the password (PBKDF2) on every request unless it caches the check: with one worker, a change
    # through the API takes effect at once; only out-of-band changes wait for the TTL.
    config.set("mlflow", "auth_cache_ttl_seconds", str(services.mlflow.auth_cache_ttl))
    layout_.auth_config.parent.mkdir(mode=0o700, exist_ok=True)
    with layout_.auth_config.open("w") as handle:
        handle.write(f"# Generated by `braintumor services up` from {template.resolve()}; rewritten at every up.\n"
                     "# No secret here: the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, the database "
                     "password from PGPASSWORD.\n")
        config.write(handle)
    return layout_.auth_config


def _mlflow_start(services: ServicesParams, layout_: Layout, secrets_: Secrets) -> int:
    ml = services.mlflow
    artifacts = Path(ml.artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    env = _server_env(("MLFLOW_AUTH_",)) | {
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(services, layout_)),
        "MLFLOW_AUTH_ADMIN_USERNAME": secrets_.admin_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_.admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_.flask_secret_key,
        "PGPASSWORD": _role_password(layout_),
    }
    command = [_executable("mlflow"), "server", "--app-name", "basic-auth",
               "--backend-store-uri", database_uri(services, "mlflow", driver="psycopg2"), "--serve-artifacts",
               "--artifacts-destination", str(artifacts), "--host", ml.host, "--port", str(ml.port),
               "--workers", str(ml.workers)]
    if ml.allowed_hosts:
        command += ["--allowed-hosts", ml.allowed_hosts]
    return _spawn(layout_, "mlflow", command, env)


def _mlflow_ready(services: ServicesParams) -> bool:
    return _get(mlflow_url(services) + "/health")[0] == 200


def _check_admin(services: ServicesParams, secrets_: Secrets) -> None:
    url = f"{mlflow_url(services)}/api/2.0/mlflow/users/get?username={secrets_.admin_username}"
    status, _ = _get(url, auth=f"{secrets_.admin_username}:{secrets_.admin_password}", timeout=30)
    if status == 200:
        return
    if status == 401:
        raise ServiceError(f"MLflow server: admin {secrets_.admin_username!r} does not accept "
                           "MLFLOW_AUTH_ADMIN_PASSWORD: MLflow sets the admin password only when it creates the user "
                           "store (the first `up`). Export the password set then, or have an admin change it "
                           "(mlflow.server.get_app_client('basic-auth', ...).update_user_password)")
    raise ServiceError(f"MLflow server: checking the admin login at {url} answered HTTP {status}: see "
                       f"the log, fix the cause, then {UP}")


# ------------------------------------------------------------------------------------------------------- Prefect

def _prefect_start(services: ServicesParams, layout_: Layout, secrets_: Secrets) -> int:
    pf = services.prefect
    layout_.prefect_home.mkdir(mode=0o700, exist_ok=True)
    env = _server_env(("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_", "PREFECT_API_URL", "PREFECT_PROFILE",
                       "PREFECT_SERVER_API_")) | {
        "PREFECT_HOME": str(layout_.prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_uri(services, "prefect", driver="asyncpg"),
        "PGPASSWORD": _role_password(layout_),
        "PREFECT_SERVER_API_AUTH_STRING": secrets_.prefect_auth_string,
        # the server's own clients (services, UI settings) talk to itself, with the same auth string
        "PREFECT_API_URL": prefect_url(services),
        "PREFECT_API_AUTH_STRING": secrets_.prefect_auth_string,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    command = [_executable("prefect"), "server", "start", "--host", pf.host, "--port", str(pf.port)]
    return _spawn(layout_, "prefect", command, env)


def _prefect_ready(services: ServicesParams) -> bool:
    return _get(prefect_url(services) + "/health")[0] == 200


def _check_prefect_auth(services: ServicesParams, layout_: Layout, secrets_: Secrets) -> None:
    status, _ = _get(prefect_url(services) + "/admin/version", auth=secrets_.prefect_auth_string, timeout=30)
    if status != 200:
        raise ServiceError(f"Prefect server: the API answered HTTP {status} to PREFECT_SERVER_API_AUTH_STRING "
                           f"(log: {layout_.log('prefect')}): a server started with another auth string is still "
                           "running; `braintumor services down`, then `up` with the string you mean")


# ----------------------------------------------------------------------------------------------------- commands

def _wait_ready(services: ServicesParams, layout_: Layout, pending: dict[str, object],
                restart: dict[str, object] | None = None) -> None:
    """Wait until every started server answers its health check, or fail naming it, its log and the fix. A server
    in `restart` (one found running, so not started) that exits while awaited is started once: it was still dying
    (e.g. just killed) when `up` looked."""
    deadline = time.monotonic() + services.startup_timeout
    pending, restart = dict(pending), dict(restart or {})
    while pending:
        for service, ready in list(pending.items()):
            if ready(services):
                logger.info("%s answers", NAMES[service])
                del pending[service]
            elif _running(layout_, service) is None and service in restart:
                logger.info("%s exited before it answered (it was stopping); starting it", NAMES[service])
                restart.pop(service)()
            elif _running(layout_, service) is None:
                raise ServiceError(f"{NAMES[service]} exited while starting; log: {layout_.log(service)}\n"
                                   f"{_tail(layout_.log(service))}\n  fix the cause above, then {UP} again")
        if pending and time.monotonic() > deadline:
            service = next(iter(pending))
            raise ServiceError(f"{NAMES[service]} did not answer within services.startup_timeout "
                               f"({services.startup_timeout:g} s); log: {layout_.log(service)}\n"
                               f"{_tail(layout_.log(service))}\n  if it is only slow, raise the timeout "
                               "(-S services.startup_timeout=600) and run `braintumor services up` again; "
                               "`braintumor services down` stops what started")
        if pending:
            time.sleep(0.5)


def _lock(layout_: Layout, timeout: float):
    from filelock import FileLock, Timeout

    lock = FileLock(str(layout_.run / "services.lock"), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ServiceError(f"another `braintumor services` command holds {layout_.run / 'services.lock'} for more "
                           f"than {timeout:g} s: wait for it to finish") from None
    return lock


def _prepare(services: ServicesParams) -> Layout:
    layout_ = layout(services)
    if not layout_.root.exists():
        layout_.root.mkdir(parents=True, mode=0o711)
    for folder, mode in ((layout_.logs, 0o711), (layout_.run, 0o700)):
        folder.mkdir(mode=mode, exist_ok=True)
    return layout_


def pipeline_env(services: ServicesParams, admin_username: str) -> list[str]:
    """Shell lines pointing the pipeline (braintumor, the mlflow CLI, flows) at the team services."""
    return [
        f"export MLFLOW_TRACKING_URI={mlflow_url(services, public=True)}",
        f"export MLFLOW_TRACKING_USERNAME={admin_username}   # or a user the admin created",
        'export MLFLOW_TRACKING_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD"   # that user\'s password',
        f"export MLFLOW_UI_URL={mlflow_url(services, public=True)}",
        f"export PREFECT_API_URL={prefect_url(services, public=True)}",
        'export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"',
    ]


def up(params: Params) -> dict:
    """Start PostgreSQL, then the MLflow and Prefect servers on it (each only if not already running)."""
    services = params.services
    secrets_ = read_secrets(services)  # before anything starts
    layout_ = _prepare(services)
    lock = _lock(layout_, services.startup_timeout)
    try:
        _pg_bin(services)
        _pg_account(services)
        running = {service: _running(layout_, service) for service in ("mlflow", "prefect")}
        hosts = {"mlflow": services.mlflow.host, "prefect": services.prefect.host}
        ports = {"mlflow": services.mlflow.port, "prefect": services.prefect.port}
        for service, pid in running.items():  # refuse a busy port before starting anything
            if pid is None and not _port_free(hosts[service], ports[service]):
                key = f"services.{service}.port"
                raise ServiceError(f"{NAMES[service]}: port {ports[service]} on {hosts[service]} is in use by "
                                   f"another program: stop it, or choose another port (-S {key}=N or params.yaml)")
        _grant_traverse(services, layout_.root)
        result = {"postgres": _postgres_up(services, layout_)}
        starters = {"mlflow": _mlflow_start, "prefect": _prefect_start}
        readiness = {"mlflow": _mlflow_ready, "prefect": _prefect_ready}
        pending, restart = {}, {}
        for service, pid in running.items():
            start = functools.partial(starters[service], services, layout_, secrets_)
            if pid is None:
                start()
                result[service] = "started"
            else:
                logger.info("%s already running (pid %d)", NAMES[service], pid)
                result[service] = "already running"
                restart[service] = start
            pending[service] = readiness[service]
        _wait_ready(services, layout_, pending, restart)
        _check_admin(services, secrets_)
        _check_prefect_auth(services, layout_, secrets_)
    finally:
        lock.release()
    return {"services": result, "exports": pipeline_env(services, secrets_.admin_username)}


def down(params: Params) -> dict:
    """Stop the Prefect and MLflow servers, then PostgreSQL; harmless when nothing runs."""
    services = params.services
    layout_ = layout(services)
    if not layout_.root.exists():
        return {service: "not running" for service in ("prefect", "mlflow", "postgres")}
    lock = _lock(layout_, services.stop_timeout + 60)
    try:
        result = {service: _stop_group(layout_, service, services.stop_timeout) for service in ("prefect", "mlflow")}
        result["postgres"] = _postgres_down(services, layout_)
    finally:
        lock.release()
    for service, state in result.items():
        logger.info("%s: %s", NAMES[service], state)
    return result


def stop_service(params: Params, service: str) -> str:
    """Stop one service ("postgres", "mlflow" or "prefect") as `down` stops it, leaving the others running (for
    fault drills: `up` starts it again). Returns "stopped" or "not running"."""
    services = params.services
    if service not in NAMES:
        raise ServiceError(f"unknown service {service!r}: one of {', '.join(NAMES)}")
    layout_ = layout(services)
    if not layout_.root.exists():
        return "not running"
    lock = _lock(layout_, services.stop_timeout + 60)
    try:
        if service == "postgres":
            state = _postgres_down(services, layout_)
        else:
            state = _stop_group(layout_, service, services.stop_timeout)
    finally:
        lock.release()
    logger.info("%s: %s", NAMES[service], state)
    return state


def status(params: Params) -> dict:
    """What runs where: each service's state, address, pid and log, and what to do about a problem."""
    services = params.services
    layout_ = layout(services)
    exists = layout_.root.exists()
    pg = _pg_status(services, layout_) if exists else None
    report: dict = {"dir": str(layout_.root)}
    report["postgres"] = {"running": pg is not None, "pid": pg and pg["pid"],
                          "address": f"127.0.0.1:{pg['port'] if pg and pg['port'] else services.postgres.port}",
                          "databases": sorted(DATABASES.values()), "role": ROLE, "data": str(layout_.data),
                          "log": str(layout_.log("postgres"))}
    urls = {"mlflow": mlflow_url(services, public=True), "prefect": prefect_url(services, public=True)}
    readiness = {"mlflow": _mlflow_ready, "prefect": _prefect_ready}
    for service in ("mlflow", "prefect"):
        pid = _running(layout_, service) if exists else None
        report[service] = {"running": pid is not None, "pid": pid, "url": urls[service],
                           "answers": bool(pid) and readiness[service](services), "log": str(layout_.log(service))}
    report["mlflow"]["artifacts"] = str(Path(services.mlflow.artifacts).resolve())
    problems = []
    if not pg and (report["mlflow"]["running"] or report["prefect"]["running"]):
        problems.append(f"PostgreSQL is not running (log: {layout_.log('postgres')}): {UP}")
    for service in ("mlflow", "prefect"):
        entry = report[service]
        if entry["running"] and not entry["answers"]:
            problems.append(f"{NAMES[service]} runs (pid {entry['pid']}) but does not answer at {entry['url']} "
                            f"(log: {entry['log']}): wait if it is starting, else `braintumor services down` "
                            "and `up`")
    if not any(report[s]["running"] for s in ("postgres", "mlflow", "prefect")):
        problems.append(f"nothing runs: {UP}")
    elif not all(report[s]["running"] for s in ("postgres", "mlflow", "prefect")):
        missing = [NAMES[s] for s in ("postgres", "mlflow", "prefect") if not report[s]["running"]]
        problems.append(f"{', '.join(missing)} not running: {UP}")
    report["problems"] = problems
    return report


def run(action: str, params: Params) -> dict:
    return {"up": up, "down": down, "status": status}[action](params)
