"""Every way `facemark serve` is stopped drains it: SIGINT to its main process, SIGTERM or SIGINT to its whole
process group (`kill -TERM -- -PGID`, Ctrl-C in a shell), and a systemd stop with KillMode=control-group (SIGTERM
to every process of the unit, SIGKILL to what is left after TimeoutStopSec). Requests in flight are all answered
and the exit is 0; a drain cut by --grace exits 1 and says how many; a tritonserver that dies is named with its
signal. (SIGTERM to the main process alone: test_serve.py.)

Each test starts its own server on free loopback ports, in its own session as systemd or a shell would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import pytest
from conftest import SAMPLES
from test_serve import _alive

from facemark.benchmarks.serve_load import ServerProcess, process_tree

PHOTO = SAMPLES / "2008_002470.jpg"
CLIENTS = 8
TIMEOUT_STOP_S = 90  # the unit's TimeoutStopSec in the systemd emulation (docs/SERVING.md)


def _signal_each(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(pid, signum)


def _systemd_stop(server: ServerProcess) -> None:
    """What `systemctl stop` does with KillMode=control-group: SIGTERM (and SIGCONT) to every process of the
    unit at once, then SIGKILL to those still there after TimeoutStopSec."""
    unit = process_tree(server.proc.pid)
    _signal_each(unit, signal.SIGTERM)
    _signal_each(unit, signal.SIGCONT)

    def final_kill() -> None:
        deadline = time.monotonic() + TIMEOUT_STOP_S
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_each([pid for pid in unit if _alive(pid)], signal.SIGKILL)

    threading.Thread(target=final_kill, daemon=True).start()


STOPS = {
    "SIGINT to the main process": lambda server: server.proc.send_signal(signal.SIGINT),
    "SIGTERM to the process group": lambda server: os.killpg(server.proc.pid, signal.SIGTERM),
    "SIGINT to the process group": lambda server: os.killpg(server.proc.pid, signal.SIGINT),
    "systemd stop (KillMode=control-group)": _systemd_stop,
}


def _requests_in_flight(url: str, answers: dict[int, tuple[float, object]]) -> list[threading.Thread]:
    """CLIENTS requests of 4 photos of 1500x996 each (a few seconds of work in all on 2 cores), each answer
    recorded as (when, fewest faces of its images) or (when, the error)."""
    from facemark.runtime.serving.client import TritonLandmarker

    big = cv2.resize(cv2.imread(str(PHOTO)), None, fx=3, fy=3)
    data, size = cv2.imencode(".jpg", big)[1].tobytes(), (big.shape[1], big.shape[0])

    def send(slot: int) -> None:
        try:
            found = TritonLandmarker(url, timeout_s=120).detect_encoded([data] * 4, [size] * 4)
            errors = [error for _, error in found if error]
            answers[slot] = (time.monotonic(), errors[0] if errors else min(len(faces) for faces, _ in found))
        except Exception as exc:  # recorded: the assertion names it
            answers[slot] = (time.monotonic(), repr(exc))

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads


def _start(tmp_path: Path, *args: str) -> ServerProcess:
    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install 'facemark[serve]')")
    return ServerProcess(["--max-batch-size", "8", *args], log=tmp_path / "serve.log", new_session=True)


@pytest.mark.parametrize("stop", list(STOPS))
def test_every_stop_drains_the_requests_in_flight_then_exits_0(stop, tmp_path):
    server = _start(tmp_path, "--grace", "60")
    family = process_tree(server.proc.pid)
    try:
        answers: dict[int, tuple[float, object]] = {}
        threads = _requests_in_flight(server.url, answers)
        time.sleep(0.4)
        sent = time.monotonic()
        STOPS[stop](server)
        for thread in threads:
            thread.join(120)
        code = server.proc.wait(120)
    finally:
        _signal_each([pid for pid in process_tree(server.proc.pid) if pid != server.proc.pid], signal.SIGKILL)
        server.stop()
    log = server.log.read_text()
    assert sorted(answers) == list(range(CLIENTS))
    assert [value for _, value in answers.values() if not isinstance(value, int) or value < 1] == [], log[-3000:]
    assert max(when for when, _ in answers.values()) > sent, "no request was still in flight at the signal"
    assert code == 0, log[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in family if _alive(pid)]


def test_a_drain_cut_by_grace_exits_1_and_says_how_many_and_leaves_no_process(tmp_path):
    server = _start(tmp_path, "--grace", "1")
    family = process_tree(server.proc.pid)
    try:
        answers: dict[int, tuple[float, object]] = {}
        threads = _requests_in_flight(server.url, answers)
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        code = server.proc.wait(120)
    finally:
        server.stop()
    cut = [value for _, value in answers.values() if not isinstance(value, int)]
    assert cut, "every request finished within 1 s: nothing to cut"
    lines = [line for line in server.log.read_text().splitlines() if "did not finish within --grace 1 s" in line]
    assert code == 1 and len(lines) == 1, server.log.read_text()[-3000:]
    assert f": {len(cut)} HTTP request(s) in flight were not answered" in lines[0], (lines[0], cut)
    # a stub whose model was executing when Triton's exit timeout ended it would wait forever: it is killed
    assert not [pid for pid in family if _alive(pid)]


def test_a_tritonserver_killed_is_named_with_its_signal(tmp_path):
    server = _start(tmp_path, "--grace", "5")
    try:
        triton = [pid for pid in process_tree(server.proc.pid)
                  if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)
        code = server.proc.wait(120)
    finally:
        server.stop()
    errors = [line for line in server.log.read_text().splitlines() if line.startswith("ERROR ")]
    assert code == 1 and len(errors) == 1, server.log.read_text()[-3000:]
    assert f"tritonserver (pid {triton[0]}) was killed by SIGKILL" in errors[0]
    assert "Triton's last error" not in errors[0]  # a start-up warning in its log is not the cause


def test_a_killed_main_process_leaves_no_process_behind(tmp_path):
    """tritonserver runs with SIGTERM blocked: it must still go when facemark serve is killed outright (it gets
    SIGINT then, and drains), and so must the stubs and the decoders."""
    server = _start(tmp_path, "--grace", "5")
    family = process_tree(server.proc.pid)
    assert len(family) >= 4  # facemark serve, its decoders, tritonserver, the stubs
    try:
        server.proc.kill()
        server.proc.wait(30)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in family if _alive(pid)]
    finally:
        _signal_each([pid for pid in family if _alive(pid)], signal.SIGKILL)
