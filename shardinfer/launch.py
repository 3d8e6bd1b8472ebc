"""`shardinfer launch`: N local processes that form one mesh, under a supervisor.

The stand-in for N hosts: each child runs `python -m shardinfer.cli <command>` with
SHARDINFER_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set (and D simulated CPU devices), so
`distributed.initialize` joins them. Each output line is prefixed with its process. SIGINT and
SIGTERM are passed on to every child. When any child exits non-zero, dies by a signal, or stays
stopped (SIGSTOP) longer than `stopped_limit`, the others are stopped and launch exits
non-zero, naming the process and how it ended: a dead peer costs at most ~`grace` + 1 s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from shardinfer.host_devices import set_host_devices

POLL_SECONDS = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Gloo prints a line to stdout per peer connection it makes ("[Gloo] Rank 2 is connected to 7
# peer ranks. Expected number of connected peer ranks is : 7"), from several threads at once,
# so lines come interleaved; they say nothing a user needs and would mix into the output.
_GLOO_CHATTER = re.compile(r".*connected peer ranks is : \d+$")


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        if not _GLOO_CHATTER.match(line):
            out.write(f"{prefix}{line}")
            out.flush()


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP), from /proc (Linux); False elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _how(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def launch(
    num_processes: int,
    command: Sequence[str],
    host_devices: int | None = None,
    grace: float = 5.0,
    stopped_limit: float = 2.0,
) -> int:
    """Runs the command in `num_processes` processes; returns launch's exit status."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("launch needs a shardinfer command after --, e.g. -- generate ...")
    coordinator = f"127.0.0.1:{_free_port()}"
    children: list[subprocess.Popen] = []
    pumps = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(SHARDINFER_COORDINATOR=coordinator, SHARDINFER_NUM_PROCESSES=str(num_processes),
                   SHARDINFER_PROCESS_ID=str(i))  # fmt: skip
        if host_devices is not None:
            set_host_devices(host_devices, env)
        child = subprocess.Popen([sys.executable, "-m", "shardinfer.cli", *command], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)  # fmt: skip
        children.append(child)
        print(f"launch: process {i} is pid {child.pid}", file=sys.stderr, flush=True)
        for stream, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
            pump = threading.Thread(target=_pump, args=(stream, f"[{i}] ", out), daemon=True)
            pump.start()
            pumps.append(pump)

    def forward(sig, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failure = _supervise(children, stopped_limit)
        if failure is not None:
            index, how = failure
            print(f"launch: process {index} {how}; stopping the others", file=sys.stderr,
                  flush=True)  # fmt: skip
            _stop_all(children, grace)
        for pump in pumps:
            pump.join(timeout=2)
        return 0 if failure is None else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _supervise(children: list[subprocess.Popen], stopped_limit: float) -> tuple[int, str] | None:
    """Waits until every child exited 0 (None) or one failed: (its index, how it ended)."""
    stopped_since: dict[int, float] = {}
    while True:
        running = 0
        for i, child in enumerate(children):
            code = child.poll()
            if code is None:
                running += 1
                if _stopped(child.pid):
                    since = stopped_since.setdefault(i, time.monotonic())
                    if time.monotonic() - since > stopped_limit:
                        return i, f"is stopped (SIGSTOP) for over {stopped_limit:.0f} s"
                else:
                    stopped_since.pop(i, None)
            elif code != 0:
                return i, _how(code)
        if not running:
            return None
        time.sleep(POLL_SECONDS)


def _stop_all(children: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM (and SIGCONT, for a stopped one), then SIGKILL after `grace` seconds."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
