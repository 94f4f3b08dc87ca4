"""The project's nginx load balancer in front of two real service replicas.

nginx runs the configuration from docker/nginx.conf.template (rendered by docker/render_nginx.py,
the same template docker-compose.yml uses); the replicas are `python -m app serve` processes on
127.0.0.1 serving a tiny model. Under a bounded load (200 predict/explain requests, 8 at a time):
requests reach both replicas; a replica sent SIGTERM drains and no request fails; a replica killed
with SIGKILL costs no failed request, because nginx sends the request to the other replica. An upload
over the service's body limit is refused by nginx itself. The health check commands of the image and
of docker-compose.yml run against a replica, too.

nginx comes from the Debian packages (installed here when it is missing and this runs as root).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.helpers import free_port, save_self_describing

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
TOTAL_REQUESTS = 200
CONCURRENCY = 8
REQUEST_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 10
# The signal goes out once this many requests are done and each replica has answered some of them.
TRIGGER_AFTER = 40
TRIGGER_PER_REPLICA = 5


# --- nginx -----------------------------------------------------------------------------------------


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt/dpkg run to finish instead of failing on its lock.
    command = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300", *args]
    return subprocess.run(
        command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
    )


def _install_nginx() -> str:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(
            "nginx is not installed and cannot be installed here (needs root and apt-get); "
            "install the Debian package nginx-light (or nginx) to run this test"
        )
    transcript: list[str] = []
    for attempt in range(3):
        update = _apt_get("update")
        transcript.append(
            f"$ apt-get update (attempt {attempt + 1}): {update.returncode}\n{update.stderr[-1500:]}"
        )
        if update.returncode == 0:
            break
        time.sleep(5)
    # nginx-light is the smallest build with the upstream and proxy modules; newer Debian releases
    # fold it into plain nginx.
    for package in ("nginx-light", "nginx"):
        install = _apt_get("install", "-y", "--no-install-recommends", package)
        transcript.append(f"$ apt-get install {package}: {install.returncode}\n{install.stderr[-1500:]}")
        found = _find_nginx()
        if install.returncode == 0 and found:
            return found
    pytest.fail("could not install nginx from the Debian packages:\n" + "\n".join(transcript))


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    return _find_nginx() or _install_nginx()


def _load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_nginx", REPO / "docker" / "render_nginx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no output)"


@dataclass
class Nginx:
    """nginx in the foreground with its own prefix directory, stopped by the fixture."""

    binary: str
    prefix: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def _command(self, *extra: str) -> list[str]:
        # daemon, pid and the startup error log are set here: they are the container's business
        # in docker-compose.yml and not part of the template.
        directives = f"daemon off; pid {self.prefix}/nginx.pid;"
        return [
            self.binary,
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.config),
            "-e",
            "stderr",
            "-g",
            directives,
            *extra,
        ]

    def start(self, upstreams: list[str], edit: Callable[[str], str] | None = None) -> None:
        """Render the template for ``upstreams`` (``edit``, if given, changes the rendered text)."""
        temp_dir = self.prefix / "temp"
        temp_dir.mkdir()
        # Run as root, nginx's workers switch to an unprivileged user: let them reach the temp files.
        self.prefix.chmod(0o755)
        temp_dir.chmod(0o777)
        text = _load_renderer().render_for(f"127.0.0.1:{self.port}", upstreams, temp_dir)
        if edit is not None:
            text = edit(text)
        self.config.write_text(text)
        check = subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"nginx -t rejects the rendered configuration:\n{check.stderr}"
        with self.access_log.open("wb") as access, self.error_log.open("wb") as errors:
            self.process = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=access, stderr=errors
            )
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(f"nginx exited with {self.process.returncode}:\n{_tail(self.error_log)}")
                try:
                    if client.get(f"{self.url}/nginx-health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        pytest.fail(f"nginx did not answer on {self.url}:\n{_tail(self.error_log)}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)  # graceful shutdown
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


# --- replicas --------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `python -m app serve` process on 127.0.0.1."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running():
                    code = self.process.returncode if self.process else None
                    pytest.fail(f"replica {self.name} exited ({code}) before it was ready:\n{self.log()}")
                try:
                    if client.get(f"http://{self.address}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        pytest.fail(f"replica {self.name} was not ready within {READY_TIMEOUT_S:.0f} s:\n{self.log()}")

    def send(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if not self.running():
            return
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=DRAIN_TIMEOUT_S + 20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return _tail(self.log_path)


def _replica_env(weights: Path, workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECIPROCAM_")}
    env.update(
        {
            "RECIPROCAM_MODELS": json.dumps([{"name": MODEL_NAME, "weights": str(weights), "device": "cpu"}]),
            "RECIPROCAM_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
            "HF_HOME": str(workdir / "hf-home"),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    workdir = tmp_path_factory.mktemp("replicas")
    weights = save_self_describing(workdir / "tiny.safetensors", "deit_tiny", seed=3)
    env = _replica_env(weights, workdir)
    pool = [Replica(name, free_port(), env, workdir / f"replica-{name}.log") for name in ("a", "b")]
    try:
        yield pool
    finally:
        for replica in pool:
            replica.stop()


@pytest.fixture
def running(replicas: list[Replica]) -> list[Replica]:
    """Both replicas up and ready; one stopped by an earlier test is started again."""
    for replica in replicas:
        if not replica.running():
            replica.start()
    for replica in replicas:
        replica.wait_ready()
    return replicas


@pytest.fixture
def balancer(nginx_binary: str, running: list[Replica]) -> Iterator[Nginx]:
    prefix = Path(tempfile.mkdtemp(prefix="reciprocam-nginx-"))
    nginx = Nginx(nginx_binary, prefix, free_port())
    try:
        nginx.start([replica.address for replica in running])
        yield nginx
    finally:
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)


# --- load ------------------------------------------------------------------------------------------


def _png(size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Outcome:
    index: int
    endpoint: str
    status: int | None
    upstreams: tuple[str, ...]  # every replica nginx tried for this request, in order
    error: str | None
    started_at: float
    finished_at: float

    @property
    def served_by(self) -> str | None:
        return self.upstreams[-1] if self.upstreams else None


class Load:
    """TOTAL_REQUESTS requests through nginx, CONCURRENCY at a time; optionally one action mid-way."""

    def __init__(
        self,
        url: str,
        trigger: Callable[[list[Outcome]], bool] | None = None,
        action: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.trigger = trigger
        self.action = action
        self.image = _png()
        self.lock = threading.Lock()
        self.next_index = 0
        self.outcomes: list[Outcome] = []
        self.fired_at: float | None = None

    def run(self) -> list[Outcome]:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(CONCURRENCY)]
        for thread in threads:
            thread.start()
        for thread in threads:
            # Bounded: every request has its own timeout, so this ends even when the service hangs.
            thread.join(timeout=TOTAL_REQUESTS * REQUEST_TIMEOUT_S)
        assert len(self.outcomes) == TOTAL_REQUESTS, (
            f"{len(self.outcomes)} of {TOTAL_REQUESTS} requests ended"
        )
        return sorted(self.outcomes, key=lambda outcome: outcome.index)

    def _worker(self) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            while True:
                with self.lock:
                    if self.next_index >= TOTAL_REQUESTS:
                        return
                    index = self.next_index
                    self.next_index += 1
                outcome = self._request(client, index)
                with self.lock:
                    self.outcomes.append(outcome)
                    if (
                        self.fired_at is None
                        and self.trigger is not None
                        and self.action is not None
                        and self.trigger(self.outcomes)
                    ):
                        self.action()
                        self.fired_at = time.monotonic()

    def _request(self, client: httpx.Client, index: int) -> Outcome:
        endpoint = "explain" if index % 2 else "predict"
        started_at = time.monotonic()
        status: int | None = None
        upstreams: tuple[str, ...] = ()
        error: str | None = None
        try:
            response = client.post(
                f"{self.url}/v1/models/{MODEL_NAME}/{endpoint}",
                files={"file": (f"image-{index}.png", self.image, "image/png")},
            )
            status = response.status_code
            header = response.headers.get("x-upstream", "")
            upstreams = tuple(part.strip() for part in header.split(",") if part.strip())
            if status != 200:
                error = response.text[:300]
            else:
                response.json()
        except (httpx.HTTPError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Outcome(index, endpoint, status, upstreams, error, started_at, time.monotonic())


def _both_serving(replicas: list[Replica]) -> Callable[[list[Outcome]], bool]:
    def trigger(outcomes: list[Outcome]) -> bool:
        if len(outcomes) < TRIGGER_AFTER:
            return False
        served = Counter(outcome.served_by for outcome in outcomes)
        return all(served[replica.address] >= TRIGGER_PER_REPLICA for replica in replicas)

    return trigger


def _assert_all_succeeded(
    outcomes: list[Outcome], nginx: Nginx, replicas: list[Replica], *, cut_short: int = 0
) -> None:
    """Every request answered 200, except at most ``cut_short`` whose answer broke off after its
    headers (a replica killed while writing it: nginx has passed the headers on and cannot retry)."""
    failed = [outcome for outcome in outcomes if outcome.status != 200 or outcome.error]
    broken_off = [o for o in failed if o.status is None and "peer closed connection" in (o.error or "")]
    if len(broken_off) <= cut_short:
        failed = [outcome for outcome in failed if outcome not in broken_off]
    if failed:
        lines = [
            f"#{o.index} {o.endpoint}: status={o.status} upstreams={o.upstreams} error={o.error}"
            for o in failed[:10]
        ]
        logs = "\n".join(f"--- replica {r.name} ---\n{r.log()}" for r in replicas)
        pytest.fail(
            f"{len(failed)} of {len(outcomes)} requests failed:\n"
            + "\n".join(lines)
            + f"\n--- nginx ---\n{_tail(nginx.error_log)}\n{logs}"
        )


# --- tests -----------------------------------------------------------------------------------------


def _health_commands() -> dict[str, list[str]]:
    """The image's HEALTHCHECK and the compose replicas' health check, as written in those files."""
    import yaml

    dockerfile = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (instruction,) = [line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK")]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose_test = compose["services"]["api"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD"
    return {"Dockerfile": json.loads(instruction.split(" CMD ", 1)[1]), "compose": compose_test[1:]}


def test_container_health_checks_pass_against_a_replica(running: list[Replica]) -> None:
    replica = running[0]
    for origin, command in _health_commands().items():
        assert command[0] == "python"
        # Same command, pointed at this replica's port instead of the container's 8000.
        argv = [sys.executable, *[part.replace("127.0.0.1:8000", replica.address) for part in command[1:]]]
        assert replica.address in " ".join(argv), f"{origin}: no http://127.0.0.1:8000 URL in {command}"
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{origin} health check failed: {result.stderr}"
    # And it fails when nothing answers: it can tell a dead replica from a live one.
    dead = f"127.0.0.1:{free_port()}"
    command = _health_commands()["Dockerfile"]
    argv = [sys.executable, *[part.replace("127.0.0.1:8000", dead) for part in command[1:]]]
    assert subprocess.run(argv, capture_output=True, text=True, timeout=30).returncode != 0


def test_requests_are_spread_over_both_replicas(balancer: Nginx, running: list[Replica]) -> None:
    outcomes = Load(balancer.url).run()

    _assert_all_succeeded(outcomes, balancer, running)
    served = Counter(outcome.served_by for outcome in outcomes)
    addresses = {replica.address for replica in running}
    assert set(served) == addresses, f"answered by {dict(served)}, replicas {sorted(addresses)}"
    # least_conn over two equal replicas: each gets a fair share, never only a handful.
    assert min(served.values()) >= TOTAL_REQUESTS // 10, f"lopsided: {dict(served)}"
    # nginx's own log names the replica of every proxied request, too.
    logged = balancer.access_log.read_text()
    for address in addresses:
        assert f"upstream=[{address}]" in logged


def test_oversized_upload_stops_at_the_balancer(balancer: Nginx, running: list[Replica]) -> None:
    # One byte over the service's own 20 MiB limit: nginx answers 413 without asking a replica.
    body = b"\0" * (20 * 1024 * 1024 + 1)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        response = client.post(
            f"{balancer.url}/v1/models/{MODEL_NAME}/predict",
            content=body,
            headers={"content-type": "application/octet-stream"},
        )
    assert response.status_code == 413
    assert not response.headers.get("x-upstream"), "the request reached a replica"


def test_sigterm_drains_without_failed_requests(balancer: Nginx, running: list[Replica]) -> None:
    victim, survivor = running
    load = Load(balancer.url, trigger=_both_serving(running), action=lambda: victim.send(signal.SIGTERM))
    outcomes = load.run()

    assert load.fired_at is not None, "the load ended before both replicas were serving"
    _assert_all_succeeded(outcomes, balancer, running)
    # The stopped replica finished what it had accepted: answers that were under way when the
    # signal went out still came back from it.
    drained = [
        outcome
        for outcome in outcomes
        if outcome.served_by == victim.address and outcome.started_at < load.fired_at < outcome.finished_at
    ]
    assert drained, "no request in flight on the stopped replica was answered by it"
    # The other replica took the requests that came after.
    assert any(o.served_by == survivor.address and o.started_at > load.fired_at for o in outcomes)
    # It then exits by itself: 0, or killed by its own SIGTERM, which uvicorn re-raises once it
    # has shut down; never a timeout that would need SIGKILL.
    code = victim.wait_exit(DRAIN_TIMEOUT_S + 30)
    assert code in (0, -signal.SIGTERM), (
        f"replica {victim.name} did not exit after draining ({code}):\n{victim.log()}"
    )


def test_sigkill_costs_no_request_thanks_to_retry(balancer: Nginx, running: list[Replica]) -> None:
    victim, survivor = running
    load = Load(balancer.url, trigger=_both_serving(running), action=lambda: victim.send(signal.SIGKILL))
    outcomes = load.run()

    assert load.fired_at is not None, "the load ended before both replicas were serving"
    assert victim.wait_exit(10) == -signal.SIGKILL
    # A response the victim was writing at the instant it died cannot be retried: nginx has already
    # passed its headers on. That is at most one per connection the victim was writing to.
    _assert_all_succeeded(outcomes, balancer, running, cut_short=2)
    # Requests that reached the killed replica were sent again to the other one.
    retried = [outcome for outcome in outcomes if len(outcome.upstreams) > 1]
    assert retried, "no request was retried on the other replica"
    assert all(outcome.upstreams[0] == victim.address for outcome in retried)
    assert all(outcome.served_by == survivor.address for outcome in retried)


def test_no_reachable_replica_gets_a_json_503_with_retry_after(nginx_binary: str) -> None:
    """With no replica to ask, nginx answers as an overloaded replica would: 503, Retry-After and
    the service's error shape, under the caller's request id when the service would accept it and
    under one of nginx's own otherwise (the body stays valid JSON)."""
    prefix = Path(tempfile.mkdtemp(prefix="reciprocam-nginx-"))
    nginx = Nginx(nginx_binary, prefix, free_port())
    try:
        nginx.start([f"127.0.0.1:{free_port()}"])  # nothing listens there
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            for supplied, kept in (("client-42.a:b", True), ('bad"id', False), ("", False)):
                headers = {"content-type": "image/png", **({"x-request-id": supplied} if supplied else {})}
                response = client.post(
                    f"{nginx.url}/v1/models/{MODEL_NAME}/predict", content=_png(), headers=headers
                )
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith("application/json")
                assert response.headers["retry-after"] == "1"
                error = response.json()["error"]
                assert error["code"] == "no_replica_available" and "retry" in error["message"]
                request_id = response.headers["x-request-id"]
                assert error["request_id"] == request_id
                if kept:
                    assert request_id == supplied
                else:
                    assert request_id != supplied and len(request_id) == 32  # nginx's $request_id
                    int(request_id, 16)
    finally:
        nginx.stop()
        shutil.rmtree(prefix, ignore_errors=True)


def test_a_replica_that_never_answers_gets_a_json_504(nginx_binary: str) -> None:
    """A replica that takes the request and never answers: after proxy_read_timeout nginx answers
    504 ``upstream_timeout`` in the service's error shape, under the caller's request id. The
    timeout is shortened from 120 s for the test; everything else is the shipped template."""
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)  # read nothing, answer nothing

    threading.Thread(target=accept, daemon=True).start()
    prefix = Path(tempfile.mkdtemp(prefix="reciprocam-nginx-"))
    nginx = Nginx(nginx_binary, prefix, free_port())

    def short_read_timeout(text: str) -> str:
        assert "proxy_read_timeout 120s;" in text
        return text.replace("proxy_read_timeout 120s;", "proxy_read_timeout 1s;")

    try:
        nginx.start([address], edit=short_read_timeout)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            response = client.post(
                f"{nginx.url}/v1/models/{MODEL_NAME}/predict",
                content=_png(),
                headers={"content-type": "image/png", "x-request-id": "slow-1"},
            )
        assert response.status_code == 504, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["x-request-id"] == "slow-1"
        assert response.headers["x-upstream"] == address
        assert response.json()["error"] == {
            "code": "upstream_timeout",
            "message": "the service replica did not answer in time",
            "request_id": "slow-1",
        }
        assert len(accepted) == 1
    finally:
        nginx.stop()
        listener.close()
        for connection in accepted:
            connection.close()
        shutil.rmtree(prefix, ignore_errors=True)
