"""GFD against a faulty API server: down at start, flapping, 409/500/403, too slow,
lying (200 answers that are not the Node).

Labels converge once the server answers again, labels GFD does not own are never sent nor
touched, and the features file is always a whole file: a reader thread parses it continuously
while the daemon (or a writer hammering it) replaces it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeApiServer

from gfd.main import Daemon, Options
from gfd.nodepatch import OWNERSHIP_ANNOTATION, KubeNodeApi, NodeApiError
from gfd.output import FeaturesFile, format_features, parse_features
from gpus.backoff import Backoff
from gpus.config import Config, Flags, GfdFlags
from gpus.model import Snapshot

from .support import TIMEOUT, watching_logs

NODE = "gpu-node-1"
FOREIGN = {"team": "ml", "nvidia.com/device-plugin.config": "x", "nvidia.com/gpu.present": "true",
           "nvidia.com/other-operator.thing": "keep", "kubernetes.io/hostname": NODE}
LINE = re.compile(r"[^=\n]+=[^\n]*")
FAST = (1.0, 0.3)  # (connect, read) seconds: a delayed answer is a timeout


class FileReader(threading.Thread):
    """Parses the features file continuously until stopped; records anything not whole."""

    def __init__(self, path: Path, valid: Callable[[dict[str, str]], bool] | None = None) -> None:
        super().__init__(name="features-reader", daemon=True)
        self.path = path
        self.valid = valid
        self.reads = 0
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.read_once = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            self.reads += 1
            self.read_once.set()
            if not self.whole(text):
                self.problems.append(text)

    def whole(self, text: str) -> bool:
        """Newline-terminated ``key=value`` lines (and one of the expected sets, if given)."""
        if text and not text.endswith("\n"):
            return False
        if not all(LINE.fullmatch(line) for line in text.splitlines()):
            return False
        return self.valid is None or self.valid(parse_features(text))

    def finish(self) -> None:
        self.stop.set()
        self.join(TIMEOUT)
        assert not self.is_alive()


class Switch:
    """A NodeApi that talks to ``down`` for its first ``failures`` calls, then to ``up``."""

    def __init__(self, down: KubeNodeApi, up: KubeNodeApi, failures: int) -> None:
        self.down, self.up, self.failures = down, up, failures
        self.calls = 0
        self.errors: list[str] = []

    def _api(self) -> KubeNodeApi:
        self.calls += 1
        return self.down if self.calls <= self.failures else self.up

    def get_node(self, name: str) -> dict[str, Any]:
        try:
            return self._api().get_node(name)
        except NodeApiError as err:
            self.errors.append(err.state)
            raise

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._api().patch_node(name, patch)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        srv.add_node(NODE, labels=FOREIGN)
        yield srv


def make_daemon(tmp_path: Path, snapshot: Snapshot, api: Any) -> Daemon:
    config = Config(flags=Flags(gfd=GfdFlags(
        oneshot=False, output_file=str(tmp_path / "features.d" / "gfd"), sleep_interval=3600,
        machine_type_file="", no_timestamp=True)))
    return Daemon(config, Options(output_mode="both", node_name=NODE),
                  reader=lambda c: snapshot, node_api=api,
                  backoff=Backoff(initial=0.01, cap=0.05))


def api_for(server: FakeApiServer, tmp_path: Path, name: str = "kc") -> KubeNodeApi:
    return KubeNodeApi.from_environment(server.kubeconfig(str(tmp_path / name)),
                                        request_timeout=FAST)


def dead_api(tmp_path: Path) -> KubeNodeApi:
    """An API whose server is gone: connections are refused."""
    dead = FakeApiServer()
    path = dead.kubeconfig(str(tmp_path / "dead-kc"))
    dead.stop()
    return KubeNodeApi.from_environment(path, request_timeout=FAST)


def inject(kind: str, server: FakeApiServer) -> None:
    if kind == "flapping":
        for _ in range(3):
            server.close_next(1)
            server.fail_next(1, 503)
    elif kind == "statuses":
        server.fail_next(2, 409)
        server.fail_next(2, 500)
        server.fail_next(2, 403)
    elif kind == "slow":
        server.delay_next(3, 1.0)  # over the 0.3 s read timeout: the client gives up


def run_until_converged(daemon: Daemon, server: FakeApiServer, path: Path) -> dict[str, str]:
    """Run the loop in a thread with a racing file reader; stop once the Node converged."""
    reader = FileReader(path)
    reader.start()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), name="gfd-loop")
    thread.start()
    try:
        def converged(s: FakeApiServer) -> bool:
            if not path.exists():
                return False
            wanted = parse_features(path.read_text())
            labels = s.labels(NODE)
            return all(labels.get(k) == v for k, v in wanted.items())

        assert server.wait_for(converged, timeout=TIMEOUT), server.labels(NODE)
        assert reader.read_once.wait(TIMEOUT)
        labels = parse_features(path.read_text())
    finally:
        daemon.wakeup.request_stop()
        thread.join(TIMEOUT)
        reader.finish()
    assert not thread.is_alive() and result == [0]
    assert reader.problems == []
    return labels


def check_foreign_untouched(server: FakeApiServer, ours: dict[str, str]) -> None:
    labels = server.labels(NODE)
    for key, value in FOREIGN.items():
        assert labels[key] == value
    for request in server.requests("PATCH"):
        sent = (request.body.get("metadata") or {}).get("labels") or {}
        assert set(sent) <= set(ours), set(sent) - set(ours)
    owned = server.annotations(NODE)[OWNERSHIP_ANNOTATION].split(",")
    assert sorted("nvidia.com/" + k for k in owned) == sorted(ours)


@pytest.mark.parametrize("kind", ["flapping", "statuses", "slow"])
def test_labels_converge_after_faults(kind: str, tmp_path: Path, server: FakeApiServer,
                                      fake_snapshot: Callable[..., Snapshot]) -> None:
    inject(kind, server)
    daemon = make_daemon(tmp_path, fake_snapshot("dgx-a100"), api_for(server, tmp_path))
    with watching_logs("gfd.nodepatch") as logs:
        ours = run_until_converged(daemon, server, tmp_path / "features.d" / "gfd")
    assert ours["nvidia.com/gpu.count"] == "8"
    assert daemon.passes == 1  # convergence came from retries, not from new passes
    check_foreign_untouched(server, ours)
    assert any("cannot update labels" in m for m in logs.messages()), "faults never hit"
    assert any("labels converged" in m for m in logs.messages())


def test_a_lying_server_never_gets_an_unpinned_patch_and_stale_labels_go(
        tmp_path: Path, server: FakeApiServer, fake_snapshot: Callable[..., Snapshot]) -> None:
    """Regression (issue 10): 200 answers that are not our Node (no metadata, another Node, a
    Status, no resourceVersion) are bad responses the loop retries; the labels we owned and no
    longer produce are deleted once the server tells the truth, and no PATCH is ever unpinned."""
    stale = {"nvidia.com/mig.strategy": "single", "nvidia.com/gpu.product": "OLD"}
    server.add_node(NODE, labels=FOREIGN | stale,
                    annotations={OWNERSHIP_ANNOTATION: "mig.strategy,gpu.product"})
    lies: list[Callable[[dict[str, Any]], Any]] = [
        lambda node: {k: v for k, v in node.items() if k != "metadata"},
        lambda node: node | {"metadata": node["metadata"] | {"name": "gpu-node-2"}},
        lambda node: {"kind": "Status", "apiVersion": "v1", "status": "Success"},
        lambda node: node | {"metadata": {k: v for k, v in node["metadata"].items()
                                          if k != "resourceVersion"}},
    ]
    for lie in lies:
        server.mangle_next(1, lie)
    daemon = make_daemon(tmp_path, fake_snapshot("dgx-a100"), api_for(server, tmp_path))
    with watching_logs("gfd.nodepatch") as logs:
        ours = run_until_converged(daemon, server, tmp_path / "features.d" / "gfd")
    assert any("bad response" in m for m in logs.messages()), "the lies were never served"
    assert [r.answered for r in server.requests("GET")][:4] == [200] * 4
    assert "nvidia.com/mig.strategy" not in server.labels(NODE)
    assert server.labels(NODE)["nvidia.com/gpu.product"] == ours["nvidia.com/gpu.product"]
    labels = server.labels(NODE)
    assert all(labels[k] == v for k, v in FOREIGN.items())
    patches = server.requests("PATCH")
    assert patches and all(p.body["metadata"]["resourceVersion"] for p in patches)
    for patch in patches:  # ours set, the stale one deleted, nothing else sent
        for key, value in patch.body["metadata"].get("labels", {}).items():
            assert key in ours or (key in stale and value is None), (key, value)
    owned = server.annotations(NODE)[OWNERSHIP_ANNOTATION].split(",")
    assert sorted("nvidia.com/" + k for k in owned) == sorted(ours)


def test_api_server_down_at_start(tmp_path: Path, server: FakeApiServer,
                                  fake_snapshot: Callable[..., Snapshot]) -> None:
    api = Switch(dead_api(tmp_path), api_for(server, tmp_path), failures=4)
    daemon = make_daemon(tmp_path, fake_snapshot("dgx-a100"), api)
    ours = run_until_converged(daemon, server, tmp_path / "features.d" / "gfd")
    assert api.errors == ["connection error"] * 4
    check_foreign_untouched(server, ours)


class SlowFirstPatch:
    """The first PATCH hangs past the client's timeout; an admin edits the Node meanwhile."""

    def __init__(self, server: FakeApiServer, api: KubeNodeApi) -> None:
        self.server, self.api = server, api
        self.timed_out = False

    def get_node(self, name: str) -> dict[str, Any]:
        return self.api.get_node(name)

    def patch_node(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        if self.timed_out:
            return self.api.patch_node(name, patch)
        self.server.delay_next(1, 0.6)
        try:
            return self.api.patch_node(name, patch)
        except NodeApiError:
            self.timed_out = True
            self.server.set_labels(NODE, {"team": "infra"})
            raise


def test_late_patch_after_a_timeout_never_undoes_an_edit(
        tmp_path: Path, server: FakeApiServer, fake_snapshot: Callable[..., Snapshot]) -> None:
    """The server applies the timed-out PATCH late, after an admin edit: its resourceVersion
    is stale, so it is refused (409); GFD's retry re-reads and converges, keeping the edit."""
    api = SlowFirstPatch(server, api_for(server, tmp_path))
    daemon = make_daemon(tmp_path, fake_snapshot("dgx-a100"), api)
    ours = run_until_converged(daemon, server, tmp_path / "features.d" / "gfd")
    assert api.timed_out
    assert server.wait_for(lambda s: any(r.answered == 409 for r in s.requests("PATCH")),
                           timeout=TIMEOUT), "the late PATCH never reached the server"
    labels = server.labels(NODE)
    assert labels["team"] == "infra"
    assert all(labels[k] == v for k, v in ours.items())


def test_features_file_is_never_half_written(tmp_path: Path) -> None:
    """A writer alternating a tiny and a huge label set; every read is exactly one of them."""
    small = {"nvidia.com/gpu.count": "1"}
    huge = {f"nvidia.com/label-{i:05d}": "v" * 50 for i in range(2000)}
    sets = (format_features(small), format_features(huge))
    path = tmp_path / "features.d" / "gfd"
    reader = FileReader(path, valid=lambda labels: format_features(labels) in sets)
    features = FeaturesFile(str(path))
    features.write(small)
    reader.start()
    try:
        assert reader.read_once.wait(TIMEOUT)
        for i in range(120):
            features.write(huge if i % 2 == 0 else small)
            if i % 20 == 0:  # let the reader in between writes now and then
                reader.read_once.clear()
                assert reader.read_once.wait(TIMEOUT)
    finally:
        reader.finish()
    assert reader.problems == []
    assert reader.reads >= 10
    assert [p.name for p in path.parent.iterdir()] == ["gfd"]  # no temp file left behind


def test_refused_connection_is_a_connection_error(tmp_path: Path) -> None:
    """Regression: urllib3 2 makes NewConnectionError a TimeoutError, so a refused connection
    was reported (and logged) as a timeout."""
    with pytest.raises(NodeApiError) as info:
        dead_api(tmp_path).get_node(NODE)
    assert info.value.state == "connection error"
    assert "refused" in info.value.detail.lower()
