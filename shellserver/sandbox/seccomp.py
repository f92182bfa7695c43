"""The sandbox's seccomp filter: what namespaces, uids and caps leave open.

Standard library only (ctypes on libseccomp.so.2, which apt itself depends
on): the root launcher runs with ``python3 -I -S`` and loads this file by its
path. The filter allows by default and denies, with an errno, the syscalls a
console never needs whose kernel code is a frequent escape route, or whose
effect reaches past the sandbox's namespaces (see docs/sandbox.md).

Only the native ABI is in the filter. Any syscall made through another ABI
(i386 via ``int 0x80``, or x32 numbers on x86_64) kills the whole process:
numbers differ per ABI, so a deny list written for one ABI is an allow list
for the others, and no console program makes such calls.

Arguments are compared as the kernel reads them: ``ioctl``'s request,
``socket``'s family, ``madvise``'s advice and ``prctl``'s option are 32-bit
``int`` in the kernel, so their rules mask the upper half a caller may
fill with garbage (the bug in flatpak's TIOCSTI rule, CVE-2019-10063).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections import namedtuple

# libseccomp's constants (seccomp.h, libseccomp 2.4 and later).
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
ACT_ERRNO = 0x00050000
FLTATR_ACT_BADARCH = 2
CMP_NE = 1
CMP_GE = 5
CMP_MASKED_EQ = 7
NR_SCMP_ERROR = -1

LOW32 = 0xFFFFFFFF

CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
TIOCSETD = 0x5423

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0

# Kernel same-page merging, asked for by the process itself (mman-common.h,
# prctl.h). MADV_UNMERGEABLE and PR_GET_MEMORY_MERGE stay allowed.
MADV_MERGEABLE = 12
PR_SET_MEMORY_MERGE = 67
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
# Families below the last allowed one that are denied one by one; every
# family above AF_NETLINK is denied by a single range rule.
DENIED_LOW_FAMILIES = tuple(f for f in range(AF_NETLINK) if f not in ALLOWED_FAMILIES)

# Syscalls newer than libseccomp 2.5.4's table, by their number (the same on
# every architecture since the syscall tables were unified at 424).
NEW_SYSCALL_NUMBERS = {"open_tree_attr": 467}

Arg = namedtuple("Arg", "index op a b", defaults=(0,))
Arg.__doc__ = "One comparison on a syscall argument (all of a rule's must hold)."

Rule = namedtuple("Rule", "syscall errno args why", defaults=((), ""))
Rule.__doc__ = "Deny ``syscall`` with ``errno`` when every ``args`` comparison holds."


def _deny(syscalls, error, why):
    return [Rule(name, error, (), why) for name in syscalls.split()]


RULES = (
    # Keyrings are not namespaced: a key added here would be visible to the
    # same uid later (uids are reused by other visitors), and keyctl has a
    # long history of kernel bugs.
    *_deny("keyctl add_key request_key", errno.EPERM,
           "kernel keyrings are shared across namespaces and reused uids"),
    # eBPF and perf are large kernel attack surfaces and leak kernel
    # addresses; nothing in a console uses them.
    *_deny("bpf perf_event_open", errno.EPERM,
           "eBPF verifier and perf are large attack surfaces"),
    # userfaultfd lets an attacker stall the kernel at a chosen page fault,
    # the classic tool to win races in kernel exploits.
    *_deny("userfaultfd", errno.EPERM, "used to win kernel races in exploits"),
    # io_uring bypasses seccomp for the operations it performs and has had
    # many privilege escalations. ENOSYS: libraries then fall back to
    # ordinary syscalls as on a kernel without io_uring.
    *_deny("io_uring_setup io_uring_enter io_uring_register", errno.ENOSYS,
           "io_uring runs operations past seccomp; ENOSYS makes libraries fall back"),
    # Kernel AIO contexts come from one pool for the whole host
    # (fs.aio-max-nr, 65536 events, counted neither per uid nor per cgroup):
    # one console held all of them and io_setup failed with EAGAIN for
    # everyone. ENOSYS, as on a kernel built without AIO: libaio users fall
    # back to ordinary I/O, and glibc's POSIX aio_* uses threads, not these.
    # With io_setup gone the others have no context to act on; they go too.
    *_deny("io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents",
           errno.ENOSYS, "kernel AIO draws on a host-wide pool (fs.aio-max-nr); "
           "ENOSYS makes libraries fall back"),
    # Mounting needs CAP_SYS_ADMIN, which the console only could get in a
    # user namespace (denied below); closed here as well, old and new API.
    *_deny("mount umount2 pivot_root open_tree move_mount fsopen fsconfig fsmount "
           "fspick mount_setattr open_tree_attr", errno.EPERM,
           "no mounts: the root is built by the launcher and stays as it is"),
    # New namespaces, above all user namespaces, give the console root-like
    # capabilities over kernel code that was never meant for unprivileged
    # users (most container escapes of the last years start there).
    *_deny("unshare setns", errno.EPERM, "no new or foreign namespaces"),
    *(Rule("clone", errno.EPERM, (Arg(0, CMP_MASKED_EQ, bit, bit),),
           f"clone with {name}: no new namespaces")
      for name, bit in CLONE_NEW_FLAGS.items()),
    # clone3 passes its flags in memory, which seccomp cannot read. ENOSYS:
    # glibc then falls back to clone, whose flags the rules above inspect.
    Rule("clone3", errno.ENOSYS, (), "flags in memory; glibc falls back to clone"),
    # Replacing or extending the kernel, or stopping the machine.
    *_deny("kexec_load kexec_file_load init_module finit_module delete_module reboot",
           errno.EPERM, "no kernel replacement, modules or reboot"),
    # Time is not namespaced (CLONE_NEWTIME only offsets monotonic clocks).
    *_deny("clock_settime clock_adjtime settimeofday adjtimex", errno.EPERM,
           "the clock is the host's"),
    # Host-wide administration a console never needs (Docker's default
    # profile denies them too); all need capabilities we do not give, and
    # open_by_handle_at was the "shocker" container escape.
    *_deny("acct swapon swapoff iopl ioperm quotactl quotactl_fd open_by_handle_at "
           "lookup_dcookie uselib nfsservctl syslog", errno.EPERM,
           "host administration; open_by_handle_at escaped containers"),
    # TIOCSTI pushes bytes into a terminal's input queue: typed commands for
    # whoever reads the terminal next. The kernel allows it here
    # (dev.tty.legacy_tiocsti=1). TIOCLINUX does the same on a VT through
    # selection pasting. TIOCSETD switches line disciplines, whose rarely used
    # drivers (n_hdlc, n_gsm) had exploitable bugs.
    Rule("ioctl", errno.EPERM, (Arg(1, CMP_MASKED_EQ, LOW32, TIOCSTI),),
         "TIOCSTI: no keystroke injection"),
    Rule("ioctl", errno.EPERM, (Arg(1, CMP_MASKED_EQ, LOW32, TIOCLINUX),),
         "TIOCLINUX: no keystroke injection through a VT"),
    Rule("ioctl", errno.EPERM, (Arg(1, CMP_MASKED_EQ, LOW32, TIOCSETD),),
         "TIOCSETD: no exotic line disciplines"),
    # Socket families: a console needs unix, IPv4 and IPv6 sockets (the net
    # namespace has only its loopback, down), and NETLINK_ROUTE, which
    # glibc uses for getaddrinfo(AI_ADDRCONFIG) and if_nameindex. Every other
    # family (packet, vsock to the hypervisor, other netlink protocols, and
    # the rarely used ones with a record of bugs: rds, tipc, alg, x25...)
    # fails as on a kernel built without it.
    *(Rule("socket", errno.EAFNOSUPPORT, (Arg(0, CMP_MASKED_EQ, LOW32, family),),
           f"socket family {family}: not needed") for family in DENIED_LOW_FAMILIES),
    # A 64-bit >= comparison: also catches a family with high bits set.
    Rule("socket", errno.EAFNOSUPPORT, (Arg(0, CMP_GE, AF_NETLINK + 1),),
         "socket families above netlink (packet, vsock, ...): not needed"),
    Rule("socket", errno.EPROTONOSUPPORT,
         (Arg(0, CMP_MASKED_EQ, LOW32, AF_NETLINK), Arg(2, CMP_NE, NETLINK_ROUTE)),
         "netlink other than NETLINK_ROUTE (audit, uevents, sock_diag...)"),
    Rule("socketpair", errno.EAFNOSUPPORT, (Arg(0, CMP_NE, AF_UNIX),),
         "socketpair of anything but unix sockets"),
    # Kernel same-page merging is a timing side channel between processes:
    # writing a merged page takes a copy-on-write fault, so a console whose
    # own pages are mergeable could learn which page contents other consoles
    # (or the host) hold. Both ways to opt in work unprivileged; they matter
    # wherever the host runs ksmd. EINVAL, as on a kernel built without KSM.
    # Every other madvise advice (glibc's and CPython's MADV_DONTNEED,
    # MADV_FREE, ...) and prctl option stays allowed.
    Rule("madvise", errno.EINVAL, (Arg(2, CMP_MASKED_EQ, LOW32, MADV_MERGEABLE),),
         "MADV_MERGEABLE: no same-page merging, a cross-process timing channel"),
    Rule("prctl", errno.EINVAL, (Arg(0, CMP_MASKED_EQ, LOW32, PR_SET_MEMORY_MERGE),),
         "PR_SET_MEMORY_MERGE: no same-page merging of the whole process"),
)


class SeccompError(Exception):
    """libseccomp refused to build or load the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library():
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_export_pfc.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


def _call(result, what):
    if result < 0:
        raise SeccompError(f"{what}: {os.strerror(-result)}")


class Filter:
    """A built, not yet loaded, filter. Build before chroot, load after the drop."""

    def __init__(self, rules=RULES):
        self._lib = _library()
        self._ctx = self._lib.seccomp_init(ACT_ALLOW)
        if not self._ctx:
            raise SeccompError("seccomp_init failed")
        try:
            _call(self._lib.seccomp_attr_set(self._ctx, FLTATR_ACT_BADARCH,
                                             ACT_KILL_PROCESS),
                  "setting the bad-architecture action")
            for rule in rules:
                self._add(rule)
        except BaseException:
            self.release()
            raise

    def syscall_number(self, name):
        number = self._lib.seccomp_syscall_resolve_name(name.encode())
        if number == NR_SCMP_ERROR:
            number = NEW_SYSCALL_NUMBERS.get(name, NR_SCMP_ERROR)
        if number == NR_SCMP_ERROR:
            raise SeccompError(f"unknown syscall {name}")
        return number

    def _add(self, rule):
        number = self.syscall_number(rule.syscall)
        if number < 0:
            return  # a pseudo number: this architecture has no such syscall
        cmps = (_ArgCmp * max(1, len(rule.args)))(
            *(_ArgCmp(a.index, a.op, a.a, a.b) for a in rule.args))
        _call(self._lib.seccomp_rule_add_array(self._ctx, ACT_ERRNO | rule.errno, number,
                                               len(rule.args), cmps),
              f"rule for {rule.syscall}")

    def export_pfc(self, fd):
        """Write the filter as libseccomp's pseudo code to ``fd`` (for humans)."""
        _call(self._lib.seccomp_export_pfc(self._ctx, fd), "export")

    def load(self):
        """Load into the calling thread; it and its future children are bound."""
        _call(self._lib.seccomp_load(self._ctx), "seccomp_load")

    def release(self):
        if self._ctx:
            self._lib.seccomp_release(self._ctx)
            self._ctx = None
