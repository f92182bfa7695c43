"""A Debian 12 guest under qemu for tests/vm: built by build_image.sh, booted
with software emulation, driven over ssh and forwarded loopback ports."""

from __future__ import annotations

import glob
import os
import shlex
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

BUILD = Path(__file__).resolve().parent / "build_image.sh"
BUILD_TIMEOUT = 40 * 60  # a cold build: debootstrap and the install, on a slow mirror
BOOT_TIMEOUT = 240
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_image(out: Path) -> Path:
    """Build (or reuse) the cached base and write this tree's image to ``out``;
    the base directory (with the guest's ssh key)."""
    result = subprocess.run([str(BUILD), "image", str(out)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise RuntimeError(f"build_image.sh failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


class Guest:
    """A booted guest: ssh and the server's HTTPS port forwarded to loopback."""

    def __init__(self, base: Path, disk: Path, work: Path) -> None:
        self.base = base
        self.key = base / "id_ed25519"
        self.ssh_port = free_port()
        self.port = free_port()
        self.console_log = work / "serial.log"
        boot = base / "rootfs" / "boot"
        kernel = sorted(glob.glob(str(boot / "vmlinuz-*")))[-1]
        initrd = sorted(glob.glob(str(boot / "initrd.img-*")))[-1]
        forwards = (f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,"
                    f"hostfwd=tcp:127.0.0.1:{self.port}-:8443")
        # KVM's -cpu host aborts on these machines and the default model hangs
        # at boot: software emulation it is, niced to spare the host's tests.
        self.process = subprocess.Popen(
            ["nice", "-n", "10", "qemu-system-x86_64", "-accel", "tcg,thread=multi",
             "-cpu", "max", "-smp", "2", "-m", "2048", "-display", "none",
             "-monitor", "none", "-serial", f"file:{self.console_log}",
             "-kernel", kernel, "-initrd", initrd,
             "-append", "root=/dev/vda rw console=ttyS0 quiet",
             "-drive", f"file={disk},format=raw,if=virtio",
             # restrict=on: the guest reaches nothing outside (the build
             # installed everything); only the forwarded ports reach it.
             "-netdev", f"user,id=net0,restrict=on,{forwards}",
             "-device", "virtio-net-pci,netdev=net0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self.cert = str(work / "certificate.pem")
        self.cert_path = ""

    def wait_for_ssh(self) -> float:
        """Seconds until ssh answered (bounded by BOOT_TIMEOUT)."""
        start = time.monotonic()
        while time.monotonic() - start < BOOT_TIMEOUT:
            if self.process.poll() is not None:
                raise RuntimeError(f"qemu exited with {self.process.returncode}:\n"
                                   + self.serial())
            if self.run("true", check=False, timeout=20).returncode == 0:
                return time.monotonic() - start
            time.sleep(1)
        raise RuntimeError("the guest did not answer ssh in time:\n" + self.serial())

    def serial(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(self, command: str, *, check: bool = True, timeout: float = 60,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["ssh", "-i", str(self.key), "-p", str(self.ssh_port), *SSH_OPTIONS,
             "root@127.0.0.1", command],
            input=stdin if stdin is not None else "", capture_output=True, text=True,
            timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"guest: {command!r} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def sh(self, command: str, timeout: float = 60) -> str:
        """Run ``command`` in the guest; its stdout, stripped."""
        return self.run(command, timeout=timeout).stdout.strip()

    def write(self, path: str, text: str) -> None:
        self.run(f"cat > {shlex.quote(path)}", stdin=text)

    def fetch_certificate(self, path: str) -> None:
        Path(self.cert).write_text(self.sh(f"cat {shlex.quote(path)}") + "\n")

    # What tests/console_client.py needs of a server.
    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.base_url

    def get(self, path: str):
        import ssl

        context = ssl.create_default_context(cafile=self.cert)
        return urllib.request.urlopen(self.base_url + path, context=context, timeout=30)

    def shutdown(self) -> None:
        if self.process.poll() is None:
            self.run("systemctl poweroff", check=False, timeout=20)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def vm_available() -> str | None:
    """Why the VM tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot)"
    for tool in ("debootstrap", "qemu-system-x86_64", "mkfs.ext4", "ssh", "rsync"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "/usr/bin").split(":") + ["/usr/sbin"]):
            return f"{tool} is missing (./setup.sh test installs it)"
    return None
