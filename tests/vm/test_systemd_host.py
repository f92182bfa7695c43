"""shellserver on a real systemd host with only cgroup v2: a Debian 12 guest
booted under qemu, the project installed the README's way and started from
etc/shellserver.service. One boot serves the whole module."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import wait_until
from console_client import ConsoleClient
from guest import Guest, build_image, vm_available

pytestmark = pytest.mark.integration

UNIT_CGROUP = "/sys/fs/cgroup/system.slice/shellserver.service"
CERTIFICATE = "/var/lib/shellserver/tls/certificate.pem"
UID_MIN, UID_MAX = 200000, 200999  # the example configuration's, in the guest
MIB = 1024 * 1024
# The example configuration with what these tests need: many consoles from
# one address, no warm pool (consoles are counted and found one by one), a
# short drain, and a process rlimit above pids.max so that the cgroup is what
# stops a fork bomb.
TEST_SETTINGS = {
    "per_address = 3": "per_address = 100",
    "per_address_per_minute = 10": "per_address_per_minute = 1000",
    "pool_size = 2": "pool_size = 0",
    "shutdown_grace = 10.0": "shutdown_grace = 2.0",
    "max_processes = 64": "max_processes = 500",
}
PROMPT_TIMEOUT = 90  # IPython's start under software emulation


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """The booted guest with the server started by systemd (bounded in time)."""
    why = vm_available()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("vm")
    started = time.monotonic()
    base = build_image(work / "disk.img")
    built = time.monotonic()
    vm = Guest(base, work / "disk.img", work)
    try:
        booted = vm.wait_for_ssh()
        print(f"\nvm: image {built - started:.0f} s, boot to ssh {booted:.0f} s")
        configure(vm)
        started = vm.run("systemctl start shellserver", check=False, timeout=300)
        assert started.returncode == 0, vm.sh("journalctl -u shellserver --no-pager -o cat")
        vm.fetch_certificate(CERTIFICATE)
        yield vm
    finally:
        vm.shutdown()


def configure(vm: Guest, **extra: str) -> None:
    text = vm.sh("cat /opt/shellserver/etc/shellserver.toml")
    for old, new in {**TEST_SETTINGS, **extra}.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    vm.write("/etc/shellserver/shellserver.toml", text)


def session_cgroups(vm: Guest) -> list[str]:
    return vm.sh(f"ls -d {UNIT_CGROUP}/shellserver/i*/*/ 2>/dev/null || true").split()


def console_uids(vm: Guest) -> list[str]:
    """Processes of the console uids in the guest, as 'pid uid command'."""
    out = vm.sh("ps -eo pid=,uid=,comm=")
    return [line for line in out.splitlines()
            if UID_MIN <= int(line.split()[1]) <= UID_MAX]


def open_console(vm: Guest) -> ConsoleClient:
    client = ConsoleClient(vm)
    client.ws.settimeout(60)
    client.login()
    assert client.wait_for_prompt(1, timeout=PROMPT_TIMEOUT), client.display()
    return client


def cgroup_file(vm: Guest, group: str, name: str) -> str:
    return vm.sh(f"cat {group}{name}")


def test_ready_under_systemd_with_cgroup_v2_only(guest):
    """The unit reaches active through READY=1 on a host with only cgroup2,
    the server sitting in its own leaf of its delegated cgroup."""
    assert guest.sh("stat -fc %T /sys/fs/cgroup") == "cgroup2fs"
    assert guest.sh("grep -c ' cgroup ' /proc/self/mountinfo || true") == "0"
    shown = guest.sh("systemctl show shellserver -p Type -p ActiveState -p SubState "
                     "-p StatusText -p NRestarts")
    assert "Type=notify" in shown and "ActiveState=active" in shown, shown
    assert "StatusText=serving consoles" in shown and "NRestarts=0" in shown, shown
    pid = guest.sh("systemctl show -p MainPID --value shellserver")
    assert guest.sh(f"cat /proc/{pid}/cgroup") == \
        "0::/system.slice/shellserver.service/server"
    assert "memory pids cpu" in guest.sh(f"cat {UNIT_CGROUP}/cgroup.subtree_control") \
        or {"memory", "pids", "cpu"} <= set(
            guest.sh(f"cat {UNIT_CGROUP}/cgroup.subtree_control").split())


def test_console_prints_42_in_a_limited_cgroup(guest):
    """A console runs print(6*7) and its cgroup has the configured limits."""
    client = open_console(guest)
    try:
        assert "42" in client.run("print(6*7)", 2, timeout=60)
        (group,) = session_cgroups(guest)
        assert cgroup_file(guest, group, "memory.max") == str(256 * MIB)
        assert cgroup_file(guest, group, "memory.swap.max") == "0"
        assert cgroup_file(guest, group, "pids.max") == "64"
        assert cgroup_file(guest, group, "cpu.max") == "50000 100000"
    finally:
        client.close()
    assert wait_until(lambda: session_cgroups(guest) == [], timeout=30)


def test_memory_bomb_is_oom_killed_in_its_cgroup(guest):
    """A program that allocates past memory.max is OOM-killed inside the console's
    cgroup; the console lives on and is told."""
    client = open_console(guest)
    try:
        screen = client.run("import subprocess, sys; r = subprocess.run([sys.executable, "
                            "'-c', 'b = bytearray(1 << 30); b[::4096] = b\"x\" * (1 << 18)'"
                            "]); print('rc', r.returncode)", 2, timeout=120)
        assert "rc -9" in screen, screen
        (group,) = session_cgroups(guest)
        events = dict(line.split() for line in
                      cgroup_file(guest, group, "memory.events").splitlines())
        assert int(events["oom_kill"]) >= 1, events
        assert "42" in client.run("print(6*7)", 3, timeout=60)
        assert client.wait_for(lambda c: "ran out of memory" in (c.last_message("n") or ""),
                               timeout=30), client.messages[-5:]
    finally:
        client.close()


def test_fork_bomb_stops_at_pids_max(guest):
    """Starting processes without end stops at the cgroup's pids.max."""
    client = open_console(guest)
    try:
        bomb = ("exec(\"import subprocess\\nps = []\\ntry:\\n    while len(ps) < 400: "
                "ps.append(subprocess.Popen(['sleep', '300']))\\nexcept OSError as e: "
                "print('stopped at', len(ps), e.errno)\\nfor p in ps: p.kill(); p.wait()\")")
        screen = client.run(bomb, 2, timeout=180)
        match = re.search(r"stopped at (\d+) 11", screen)
        assert match, screen
        assert int(match.group(1)) < 64
        (group,) = session_cgroups(guest)
        events = dict(line.split() for line in
                      cgroup_file(guest, group, "pids.events").splitlines())
        assert int(events["max"]) >= 1, events
        assert "42" in client.run("print(6*7)", 3, timeout=60)
    finally:
        client.close()


def test_stop_drains_and_leaves_no_cgroup(guest):
    """systemctl stop tells the consoles, ends them, and leaves no cgroup and no
    console process; a start afterwards serves again."""
    client = open_console(guest)
    try:
        guest.sh("systemctl stop shellserver", timeout=120)
        assert client.wait_for(lambda c: "shutting down" in " ".join(c.messages), timeout=30)
        assert guest.sh(f"test -e {UNIT_CGROUP} && echo present || echo gone") == "gone"
        assert console_uids(guest) == []
        assert "inactive" in guest.run("systemctl is-active shellserver", check=False).stdout
    finally:
        client.close()
        guest.sh("systemctl start shellserver", timeout=300)


def test_kill_then_start_leaves_nothing_of_old_consoles(guest):
    """After systemctl kill -s KILL and a start, nothing of the old consoles lives."""
    client = open_console(guest)
    try:
        client.run("import subprocess; p = subprocess.Popen(['sleep', '1000'])", 2,
                   timeout=60)
        (old,) = session_cgroups(guest)
        assert console_uids(guest)
        guest.sh("systemctl kill -s KILL shellserver")
        guest.run("systemctl start shellserver", check=False, timeout=300)
        assert wait_until(lambda: guest.sh("systemctl is-active shellserver || true")
                          == "active", timeout=120)
        assert guest.sh(f"test -e {old} && echo present || echo gone") == "gone"
        assert console_uids(guest) == []
        assert session_cgroups(guest) == []
    finally:
        client.close()
    fresh = open_console(guest)
    try:
        assert "42" in fresh.run("print(6*7)", 2, timeout=60)
    finally:
        fresh.close()


ESCAPES = (
    # Each line prints one word per attempt: "contained" or what leaked.
    "import os, socket, ctypes\n"
    "def attempt(name, f):\n"
    "    try:\n"
    "        f(); print(name, 'LEAKED')\n"
    "    except Exception:\n"
    "        print(name, 'contained')\n"
    "attempt('uid0', lambda: os.setuid(0))\n"
    # The guest's sshd, on the guest's own address: outside the console's
    # network namespace.
    "attempt('net', lambda: socket.create_connection(('10.0.2.15', 22), timeout=3))\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def mount():\n"
    "    if libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) != 0: raise OSError()\n"
    "attempt('mount', mount)\n"
    "def cgroup_escape():\n"
    "    open('/sys/fs/cgroup/cgroup.procs', 'w').write(str(os.getpid()))\n"
    "attempt('cgroup', cgroup_escape)\n"
    "attempt('hostpids', lambda: os.kill(1, 0) if len([p for p in os.listdir('/proc') "
    "if p.isdigit()]) > 50 else (_ for _ in ()).throw(OSError()))\n"
)


def test_core_escape_attempts_are_contained(guest):
    """Root, the network, mounts, the host's cgroups and processes stay out of reach."""
    client = open_console(guest)
    try:
        guest_script = ESCAPES.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        screen = client.run(f'exec("{guest_script}")', 2, timeout=60)
        for name in ("uid0", "net", "mount", "cgroup", "hostpids"):
            assert f"{name} contained" in screen, screen
            assert f"{name} LEAKED" not in screen, screen
    finally:
        client.close()


def test_undelegated_unit_is_refused_once_not_in_a_loop(guest):
    """Without Delegate=yes the server stops at start-up with status 78 and a line
    naming the file and Delegate=yes, and systemd does not restart it."""
    guest.sh("systemctl stop shellserver", timeout=120)
    guest.sh("mkdir -p /run/systemd/system/shellserver.service.d")
    guest.write("/run/systemd/system/shellserver.service.d/test.conf",
                "[Service]\nDelegate=no\n")
    try:
        guest.sh("systemctl daemon-reload")
        since = guest.sh("date '+%Y-%m-%d %H:%M:%S'")
        assert guest.run("systemctl start shellserver", check=False,
                         timeout=300).returncode != 0
        shown = guest.sh("systemctl show shellserver -p ActiveState -p ExecMainStatus "
                         "-p NRestarts")
        # "failed", not "activating (auto-restart)": no restart is scheduled.
        assert "ActiveState=failed" in shown and "ExecMainStatus=78" in shown, shown
        assert "NRestarts=0" in shown, shown
        journal = guest.sh(f"journalctl -u shellserver --since '{since}' --no-pager -o cat")
        assert "shellserver: cannot start: cgroups: " in journal, journal
        assert "Delegate=yes" in journal and "Traceback" not in journal, journal
    finally:
        guest.sh("rm -r /run/systemd/system/shellserver.service.d && systemctl daemon-reload "
                 "&& systemctl reset-failed shellserver")
        guest.sh("systemctl start shellserver", timeout=300)


BY_HAND = ("/opt/shellserver/.venv/bin/twistd --nodaemon --pidfile= --logfile - shellserver "
           "--config /etc/shellserver/shellserver.toml")


def test_by_hand_refused_when_it_cannot_move(guest):
    """Started by hand in a scope without the cpu controller, with the move into a
    delegated scope ruled out (the marker of one already done), the server refuses
    with status 78 and the way out, and leaves nothing in the scope."""
    guest.sh("systemctl stop shellserver", timeout=120)
    try:
        refused = guest.run(f"SHELLSERVER_DELEGATED_SCOPE=1 systemd-run --scope "
                            f"--unit=byhand-refused -- {BY_HAND}", check=False, timeout=300)
        assert refused.returncode == 78, refused
        assert "cgroup.controllers offers" in refused.stderr, refused.stderr
        assert "systemd-run --scope -p Delegate=yes" in refused.stderr, refused.stderr
        assert "moving into a delegated scope" not in refused.stderr, refused.stderr
        assert wait_until(lambda: leftover_units(guest) == "", timeout=30), \
            leftover_units(guest)
    finally:
        guest.sh("systemctl start shellserver", timeout=300)


def leftover_units(guest: Guest) -> str:
    """The transient scopes and cgroups a server started by hand could leave."""
    units = guest.sh("systemctl list-units --all --plain --no-legend 'shellserver-*' "
                     "'byhand*'")
    cgroups = guest.sh("find /sys/fs/cgroup -type d \\( -name 'shellserver-*' "
                       "-o -name 'byhand*' -o -name shellserver \\) 2>/dev/null || true")
    return (units + "\n" + cgroups).strip()


def test_by_hand_from_a_root_shell(guest):
    """Started by hand from a root ssh shell (its scope lacks the cpu controller),
    the server moves itself into a delegated scope of its own, serves a console
    whose cgroup has cpu.max, and leaves no cgroup and no unit after SIGTERM."""
    guest.sh("systemctl stop shellserver", timeout=120)
    pid = None
    try:
        shell = guest.sh("cat /proc/self/cgroup")
        print(f"\nvm: a root ssh shell runs in {shell}")
        # Without logind, ssh's shells stay in ssh.service, which the unit's
        # Delegate=yes sibling may have given cpu: imitate a login's scope,
        # undelegated, as systemd-run --scope without Delegate makes one.
        wrap = "" if shell.endswith(".scope") else "systemd-run --scope --unit=byhand -- "
        own = "/sys/fs/cgroup" + (shell.split("::", 1)[1] if not wrap
                                  else "/system.slice/byhand.scope")
        if not wrap:
            assert "cpu" not in guest.sh(f"cat {own}/cgroup.controllers").split()
        guest.sh("rm -f /root/byhand.pid")
        guest.sh(f"setsid -f sh -c 'echo $$ > /root/byhand.pid; exec {wrap}{BY_HAND}' "
                 f"> /root/byhand.log 2>&1")
        assert wait_until(lambda: guest.sh("cat /root/byhand.pid 2>/dev/null || true"),
                          timeout=30)
        pid = guest.sh("cat /root/byhand.pid")
        answers = ("python3 -c \"import ssl, urllib.request; urllib.request.urlopen("
                   "'https://127.0.0.1:8443/status', context=ssl._create_unverified_context())\"")
        assert wait_until(lambda: guest.run(answers, check=False).returncode == 0,
                          timeout=120), guest.sh("cat /root/byhand.log")
        log = guest.sh("cat /root/byhand.log")
        assert "moving into a delegated scope, shellserver-i" in log, log
        assert "without cpu" in log, log
        cgroup = guest.sh(f"cat /proc/{pid}/cgroup")
        assert re.fullmatch(rf"0::/system\.slice/shellserver-i[0-9a-f]{{12}}-{pid}\.scope/server",
                            cgroup), cgroup
        scope = "/sys/fs/cgroup" + cgroup.split("::", 1)[1].rsplit("/", 1)[0]
        unit = scope.rsplit("/", 1)[1]
        assert "Delegate=yes" in guest.sh(f"systemctl show -p Delegate {unit}")
        client = open_console(guest)
        try:
            assert "42" in client.run("print(6*7)", 2, timeout=60)
            groups = guest.sh(f"ls -d {scope}/shellserver/i*/*/").split()
            assert len(groups) == 1, groups
            assert cgroup_file(guest, groups[0], "cpu.max") == "50000 100000"
            assert cgroup_file(guest, groups[0], "pids.max") == "64"
        finally:
            client.close()
        # Nothing was made in the shell's own scope.
        assert guest.sh(f"test -e {own}/shellserver && echo present || echo gone") == "gone"
        guest.sh(f"kill -TERM {pid}")
        assert wait_until(lambda: guest.run(f"kill -0 {pid}", check=False).returncode != 0,
                          timeout=120), guest.sh("cat /root/byhand.log")
        pid = None
        assert wait_until(lambda: leftover_units(guest) == "", timeout=30), \
            leftover_units(guest)
        assert console_uids(guest) == []
    finally:
        if pid is not None:
            guest.run(f"kill -KILL {pid}", check=False)
        guest.sh("systemctl start shellserver", timeout=300)


def test_unit_hardening_is_rated(guest):
    """systemd-analyze security rates the unit's hardening (printed) no worse than
    the 6.9 it had when its lines were chosen (a unit with none is 9.6)."""
    out = guest.sh("systemd-analyze security shellserver --no-pager")
    level = float(re.search(r"Overall exposure level for shellserver.service: ([\d.]+)",
                            out).group(1))
    print(f"\nsystemd-analyze security: {level}")
    assert level <= 6.9, out


def test_cpu_burner_held_to_quota_then_tarpitted(guest):
    """A CPU burner gets at most cpu.max, then the CPU budget cuts it to the
    tarpit quota and ends the console."""
    configure(guest, **{"cpu_budget = 300.0": "cpu_budget = 8.0",
                        "tarpit_seconds = 60.0": "tarpit_seconds = 5.0"})
    guest.sh("systemctl restart shellserver", timeout=300)
    client = open_console(guest)
    try:
        (group,) = session_cgroups(guest)
        client.type("while True: pass\r")
        assert client.wait_for(
            lambda c: "CPU time allowance" in (c.last_message("n") or ""), timeout=120), \
            client.messages[-5:]
        stat = dict(line.split() for line in cgroup_file(guest, group, "cpu.stat").splitlines())
        assert int(stat["nr_throttled"]) > 0, stat
        assert cgroup_file(guest, group, "cpu.max") == "5000 100000"
        assert client.wait_for(lambda c: c.closed or "allowance" in " ".join(
            m for m in c.messages if not m.startswith("o")).split("n", 1)[-1], timeout=60)
    finally:
        client.close()
        configure(guest)
        guest.sh("systemctl restart shellserver", timeout=300)


def test_watchdog_kept_fed(guest):
    """The unit's watchdog (WatchdogSec=30) never fired while the module ran
    (minutes): the server pings it while its reactor turns."""
    assert guest.sh("systemctl show -p WatchdogUSec --value shellserver") == "30s"
    journal = guest.sh("journalctl -u shellserver --no-pager -o cat")
    assert "Watchdog timeout" not in journal, journal[-2000:]
    assert "ready: listeners up" in journal


OPS_DROPIN = "/run/systemd/system/shellserver.service.d/operations.conf"
# The unit's command with the metrics and admin listeners (on the guest's loopback).
OPS_EXEC = ("/opt/shellserver/.venv/bin/twistd --nodaemon --pidfile= shellserver "
            "--config /etc/shellserver/shellserver.toml "
            "--metrics tcp:9100:interface=127.0.0.1 --admin tcp:9200:interface=127.0.0.1")
SAMPLE_LINE = re.compile(r"^(shellserver_\S+) (\S+)$", re.MULTILINE)


def guest_get(guest: Guest, url: str, token: str = "") -> str:
    """GET ``url`` from inside the guest (its loopback), with a bearer token if given."""
    headers = f"{{'Authorization': 'Bearer {token}'}}" if token else "{}"
    return guest.sh("python3 -c \"import urllib.request, sys; sys.stdout.write(urllib.request."
                    f"urlopen(urllib.request.Request('{url}', headers={headers}), "
                    "timeout=20).read().decode())\"")


def scrape(guest: Guest) -> dict[str, float]:
    return {name: float(value)
            for name, value in SAMPLE_LINE.findall(guest_get(guest, "http://127.0.0.1:9100/metrics"))}


def journal_events(guest: Guest, since: str) -> list[dict]:
    """The unit's JSON log lines since ``since``, parsed (journalctl -o cat)."""
    out = guest.sh(f"journalctl -u shellserver --since '{since}' --no-pager -o cat")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_metrics_json_journal_reload_and_admin(guest):
    """Under systemd: /metrics scraped in the guest counts a real console, the
    journal holds its JSON lifecycle lines, `systemctl reload` with a lower
    per_address refuses the next console while the first works on, and the
    admin API answers with the token systemd's state directory holds."""
    json_log = {'log_format = "text"': 'log_format = "json"'}
    configure(guest, **json_log)
    guest.sh(f"mkdir -p {OPS_DROPIN.rsplit('/', 1)[0]}")
    guest.write(OPS_DROPIN, f"[Service]\nExecStart=\nExecStart={OPS_EXEC}\n")
    try:
        guest.sh("systemctl daemon-reload")
        since = guest.sh("date '+%Y-%m-%d %H:%M:%S'")
        guest.sh("systemctl restart shellserver", timeout=300)
        client = open_console(guest)
        try:
            assert "42" in client.run("print(6*7)", 2, timeout=60)
            samples = scrape(guest)
            assert samples['shellserver_consoles_started_total{source="cold"}'] == 1, samples
            assert samples["shellserver_consoles_active"] == 1, samples
            events = journal_events(guest, since)
            started = [e for e in events if e.get("console_event") == "console_started"]
            assert len(started) == 1, events[-10:]
            assert started[0]["console"] and started[0]["user"] and started[0]["client"]
            assert started[0]["transport"] and started[0]["log_level"]["name"] == "info"

            with guest.get("/status") as response:
                assert json.loads(response.read())["accepting"] is True
            configure(guest, **json_log, **{"per_address = 3": "per_address = 1"})
            guest.sh("systemctl reload shellserver")
            assert wait_until(lambda: any("configuration reloaded" in e.get("log_format", "")
                                          for e in journal_events(guest, since)), timeout=60)
            with guest.get("/status") as response:
                assert json.loads(response.read())["reason"] == "rate-limited"
            assert "42" in client.run("print(6*7)", 3, timeout=60)
        finally:
            client.close()
        assert wait_until(lambda: scrape(guest).get(
            'shellserver_consoles_ended_total{reason="client_left"}') == 1, timeout=60)

        token = guest.sh("cat /var/lib/shellserver/admin-token")
        assert guest.sh("stat -c %a /var/lib/shellserver/admin-token") == "600"
        overview = json.loads(guest_get(guest, "http://127.0.0.1:9200/api/overview", token))
        (node,) = overview["nodes"]
        assert node["state"] == "accepting" and node["samples"]["time"], node
        assert "401" in guest.run("python3 -c \"import urllib.request; urllib.request.urlopen("
                                  "'http://127.0.0.1:9200/api/overview')\"",
                                  check=False).stderr
    finally:
        guest.sh(f"rm -f {OPS_DROPIN} && systemctl daemon-reload")
        configure(guest)
        guest.sh("systemctl restart shellserver", timeout=300)
