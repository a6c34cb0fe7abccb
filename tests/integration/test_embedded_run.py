"""`make run`'s path: `firstmile dev` on the pgserver-embedded database, from an empty data dir."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from firstmile.wiring.embedded import stop_embedded
from tests.conftest import _TAG
from tests.factories import DEMO_MANIFEST, ROOT

pytestmark = pytest.mark.embedded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _call(method: str, url: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def data_dir(worker_id: str) -> Iterator[Path]:
    # pgserver runs PostgreSQL as an unprivileged user when we are root: the folder must be
    # reachable by it, which pytest's 0700 tmp folders are not.
    path = ROOT / ".firstmile" / f"test-embedded-{_TAG}{worker_id}"  # concurrent runs keep apart by their tag
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    yield path
    stop_embedded(path)
    shutil.rmtree(path, ignore_errors=True)


def _dev(data_dir: Path, port: int, models: Path, demo_host_port: int = 0) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRSTMILE_")}
    env |= {"FIRSTMILE_DATA_DIR": str(data_dir), "FIRSTMILE_PORT": str(port), "FIRSTMILE_LOG_LEVEL": "WARNING"}
    # Already-trained models: `dev` trains the full set only when the registry has none in production.
    env["FIRSTMILE_MODEL_REGISTRY_URI"] = str(models)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firstmile.cli",
            "dev",
            "--manifest",
            str(DEMO_MANIFEST),
            "--demo-host-port",
            str(demo_host_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


def _wait_for_key(proc: subprocess.Popen[str], port: int, *, demo_host: bool = False) -> tuple[str, str]:
    """The demo API key and the admin UI's one-time login link `dev` prints, once the server is ready
    (with ``demo_host``, also once it printed the embed SDK's demo page, kept in ``PRINTED``)."""
    assert proc.stdout is not None
    key = link = ""
    demo = not demo_host
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (key and link and demo):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"firstmile dev exited with {proc.returncode}")
        if line.startswith("Demo API key"):
            key = line.rsplit(" ", 1)[-1].strip()
        if line.startswith("Admin UI, one-time login"):
            link = line.rsplit(" ", 1)[-1].strip()
        if line.startswith("Embed SDK demo"):
            PRINTED["embed"] = line.rsplit(" ", 1)[-1].strip()
            demo = True
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
                if response.status == 200:
                    return key, link
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not become ready")


PRINTED: dict[str, str] = {}


def _embed_demo(page_url: str, api: str) -> None:
    """The printed demo host page: one script tag of this API's SDK with a publishable key, and its backend's
    identity token for demo-user, which the embed API accepts from the page's origin."""
    with httpx.Client(timeout=10) as http:
        page = http.get(page_url)
        assert page.status_code == 200, page.text
        assert f'src="{api}/embed/v1/firstmile.js"' in page.text
        key = page.text.split('data-key="', 1)[1].split('"', 1)[0]
        assert key.startswith("fmpk_")
        token = http.get(page_url.rstrip("/") + "/identity").json()["token"]
        origin = page_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}", "X-Firstmile-Identity": token, "Origin": origin}
        checklist = http.get(f"{api}/v1/embed/checklist", headers=headers)
        assert checklist.status_code == 200, checklist.text
        assert checklist.json()["user_id"] == "demo-user"
        assert http.get(f"{api}/embed/v1/firstmile.js").status_code == 200


def _admin_login(link: str) -> dict[str, Any]:
    """Follow the printed link as a browser would: its page, then the POST that spends it; /admin/api/me."""
    token = parse_qs(urlsplit(link).query)["token"][0]
    base = f"{urlsplit(link).scheme}://{urlsplit(link).netloc}"
    with httpx.Client(base_url=base, follow_redirects=False, timeout=10) as browser:
        assert browser.get(link).status_code == 200
        redeemed = browser.post("/admin/bootstrap/redeem", data={"token": token})
        assert redeemed.status_code == 303, redeemed.text
        # the cookie is Secure: a browser sends it to http://127.0.0.1, httpx's jar only over https
        cookie = redeemed.headers["set-cookie"].split(";", 1)[0]
        me = browser.get("/admin/api/me", headers={"Cookie": cookie})
        assert me.status_code == 200, me.text
        again = browser.post("/admin/bootstrap/redeem", data={"token": token})
        assert again.status_code == 400  # one time only
        body: dict[str, Any] = me.json()
        return body


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def test_dev_serves_the_demo_on_the_embedded_database(data_dir: Path, tiny_registry: Path) -> None:
    port, host_port = _free_port(), _free_port()
    proc = _dev(data_dir, port, tiny_registry, host_port)
    try:
        key, link = _wait_for_key(proc, port, demo_host=True)
        base = f"http://127.0.0.1:{port}"
        assert link.startswith(f"{base}/admin/bootstrap?token=")
        assert PRINTED["embed"] == f"http://127.0.0.1:{host_port}/"
        _embed_demo(PRINTED["embed"], base)
        me = _admin_login(link)
        assert (me["tenant"]["slug"], me["roles"], me["origin"]) == ("demo", ["owner"], "bootstrap")
        # The demo is adaptive: the path model decides (it loads in the background, and until it
        # has, starts are decided by the rules with fallback_reason not_deployed).
        deadline = time.monotonic() + 60
        user = 0
        while True:
            user += 1
            body = {"user_id": f"demo-{user}", "traits": {"persona": "developer"}}
            status, state = _call("POST", f"{base}/v1/onboarding/start", key, body)
            assert status == 201, state
            decision = state["decision"]
            if decision["selected_by"] == "experiment":  # make run's demo experiment admitted this developer
                continue
            if decision["selected_by"] == "model" or time.monotonic() > deadline:
                break
            assert decision["fallback_reason"] == "not_deployed"
            time.sleep(0.5)
        assert (decision["selected_by"], decision["model"]) == ("model", "path_classifier")
        first = state["current_step"]
        status, state = _call("POST", f"{base}/v1/onboarding/demo-{user}/steps/{first}/complete", key)
        assert status == 200 and state["current_step"] != first
    finally:
        _stop(proc)
    # a second run reuses the database, the manifest (no changes) and the printed key
    port = _free_port()
    proc = _dev(data_dir, port, tiny_registry)
    try:
        assert _wait_for_key(proc, port)[0] == key
        status, state = _call("GET", f"http://127.0.0.1:{port}/v1/onboarding/demo-{user}", key)
        assert status == 200 and state["progress"]["completed_required"] == 1
    finally:
        _stop(proc)
