"""The control socket and the ``fake-nvml`` CLI drive a fake installed in this process."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator

import pytest

from gpus.fake import FakeNvml
from gpus.fake.cli import main
from gpus.fake.control import ControlError, handle_request, send
from gpus.nvml import Nvml, NvmlError
from gpus.nvmlevents import EventWatcher

FakeFactory = Callable[..., FakeNvml]


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A short socket path (AF_UNIX limit)."""
    directory = tempfile.mkdtemp(prefix="nvk", dir="/tmp")
    yield f"{directory}/ctl.sock"
    shutil.rmtree(directory, ignore_errors=True)


def test_xid_over_socket_reaches_a_waiter(fake_nvml: FakeFactory, sock_path: str) -> None:
    fake = fake_nvml("dgx-a100-mig", control_socket=sock_path)
    mig = fake.mig_uuids(0)[2]
    with Nvml() as nvml, EventWatcher(nvml, fake.uuids()) as watcher:
        got = []
        thread = threading.Thread(target=lambda: got.append(watcher.wait(10_000)))
        thread.start()
        assert send(sock_path, {"op": "xid", "gpu": mig, "xid": 31}) == {"ok": True, "delivered": 1}
        thread.join(10)
    assert got[0] is not None and got[0].xid == 31 and got[0].gpu_instance_id == 9


def test_socket_faults_and_status(fake_nvml: FakeFactory, sock_path: str) -> None:
    fake = fake_nvml("t4", control_socket=sock_path)
    send(sock_path, {"op": "lose", "gpu": 1})
    send(sock_path, {"op": "fail", "function": "nvmlDeviceGetName", "error": "UNKNOWN", "count": 2})
    status = send(sock_path, {"op": "status"})
    assert status["lost"] == [1]
    assert status["failures"] == {"nvmlDeviceGetName": {"error": 999, "remaining": 2}}
    with Nvml() as nvml:
        with pytest.raises(NvmlError, match="GPU_IS_LOST"):
            nvml.probe(fake.uuids()[1])
        send(sock_path, {"op": "clear"})
        nvml.probe(fake.uuids()[1])
        assert len(nvml.read_snapshot().gpus) == 4


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"op": "nope"}, "unknown op"),
        ({"op": "xid", "gpu": 0}, "'xid' must be an integer"),
        ({"op": "xid", "gpu": 17, "xid": 1}, "no GPU with index 17"),
        ({"op": "lose", "gpu": True}, "'gpu' must be"),
        ({"op": "fail", "function": "nvmlX", "error": "BOGUS"}, "unknown NVML error"),
        ([], "JSON object"),
    ],
)
def test_bad_requests_change_nothing(fake_nvml: FakeFactory, request_: object, error: str) -> None:
    fake = fake_nvml("t4")
    reply = handle_request(fake, request_)
    assert reply["ok"] is False and error in reply["error"]
    assert fake.status()["lost"] == [] and fake.status()["failures"] == {}


def test_garbage_line_gets_an_error_reply(fake_nvml: FakeFactory, sock_path: str) -> None:
    fake_nvml("t4", control_socket=sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        sock.sendall(b"not json\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False and "not JSON" in reply["error"]
    with pytest.raises(ControlError, match="unknown op"):
        send(sock_path, {"op": "nope"})


def test_uninstall_removes_socket(sock_path: str) -> None:
    from gpus.fake import install

    fake = install("t4", control_socket=sock_path)
    fake.uninstall()
    with pytest.raises(ControlError, match="cannot reach"):
        send(sock_path, {"op": "ping"})


def test_cli_inject(
    fake_nvml: FakeFactory, sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = fake_nvml("t4", control_socket=sock_path)
    assert main(["inject", "--control", sock_path, "lose", "2"]) == 0
    assert (
        main(["inject", "--control", sock_path, "fail", "nvmlDeviceGetUUID", "15", "--count", "1"])
        == 0
    )
    assert main(["inject", "--control", sock_path, "fail-event-wait"]) == 0
    status = fake.status()
    assert status["lost"] == [2]
    assert status["failures"]["nvmlDeviceGetUUID"] == {"error": 15, "remaining": 1}
    assert "nvmlEventSetWait" in status["failures"]
    assert main(["inject", "--control", sock_path, "clear"]) == 0
    assert fake.status()["lost"] == []
    capsys.readouterr()
    assert main(["inject", "--control", sock_path, "xid", fake.uuids()[0], "79"]) == 0
    assert json.loads(capsys.readouterr().out) == {"delivered": 0}
    assert main(["inject", "--control", sock_path, "lose", "9"]) == 1
    assert "no GPU with index 9" in capsys.readouterr().err


def test_cli_inject_needs_control(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FAKE_NVML_CONTROL", raising=False)
    assert main(["inject", "clear"]) == 2
    assert "--control" in capsys.readouterr().err


def test_cli_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "dgx-a100 " in out and "hgx-16" in out and "_models" not in out
    assert main(["show", "dgx1-v100"]) == 0
    out = capsys.readouterr().out
    assert "Tesla V100-SXM2-16GB" in out and "NV2" in out and "SYS" in out
    assert main(["show", "a100-mig-mixed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["profile"] for m in data["gpus"][0]["mig_devices"]] == [
        "3g.20gb",
        "2g.10gb",
        "1g.5gb",
    ]
    assert data["gpus"][0]["numa_node"] == 3
    assert main(["show", "no-such"]) == 1
    assert "unknown profile" in capsys.readouterr().err


class LogSeen(logging.Handler):
    """Sets ``seen`` once a record with ``text`` in its message is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_an_xid_waits_for_a_watcher_that_registers_late(
    fake_nvml: FakeFactory, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A daemon still starting has not registered for events yet; without the wait the XID
    # would be posted to nobody (NVML does not replay events to sets registered later).
    fake = fake_nvml("t4", control_socket=sock_path)
    replies: list[dict[str, object]] = []
    inject = threading.Thread(target=lambda: replies.append(
        send(sock_path, {"op": "xid", "gpu": 2, "xid": 79, "wait": 20}, timeout=30)))
    waiting = LogSeen("waiting up to 20 s for a daemon to watch GPU 2")
    logger = logging.getLogger("gpus.fake")
    logger.addHandler(waiting)
    with caplog.at_level(logging.INFO, "gpus.fake"):
        inject.start()
        assert waiting.seen.wait(10)  # the request is held, nobody watches yet
    logger.removeHandler(waiting)
    with Nvml() as nvml:
        with EventWatcher(nvml, fake.uuids()) as watcher:
            event = watcher.wait(10_000)
        inject.join(10)
    assert replies == [{"ok": True, "delivered": 1}]
    assert event is not None and event.xid == 79 and event.gpu_uuid == fake.uuids()[2]


def test_an_event_nobody_watches_is_posted_to_nobody_after_the_wait(
    fake_nvml: FakeFactory, sock_path: str
) -> None:
    fake_nvml("t4", control_socket=sock_path)
    assert send(sock_path, {"op": "xid", "gpu": 0, "xid": 79, "wait": 0.05}) == {
        "ok": True, "delivered": 0}
    assert send(sock_path, {"op": "ecc", "gpu": 0, "wait": 0.05}) == {"ok": True, "delivered": 0}


@pytest.mark.parametrize("wait", [-1, 31, "5", True])
def test_a_bad_event_wait_is_refused(fake_nvml: FakeFactory, wait: object) -> None:
    fake = fake_nvml("t4")
    reply = handle_request(fake, {"op": "xid", "gpu": 0, "xid": 79, "wait": wait})
    assert reply["ok"] is False and "'wait'" in str(reply["error"])
