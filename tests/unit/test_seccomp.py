"""Tests for shellserver.sandbox.seccomp: the rule table and building the filter.

Loading a filter binds a process for good, so that happens only in real
sandboxes (tests/security); here the table is checked, and built in memory.
"""

import errno

from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox import seccomp
from shellserver.sandbox.seccomp import (
    CMP_GE,
    CMP_MASKED_EQ,
    LOW32,
    RULES,
    Arg,
    Filter,
    SeccompError,
)

# What the issue asks the filter to close, by syscall name.
REQUIRED_DENIED = (
    "keyctl add_key request_key bpf perf_event_open io_uring_setup io_uring_enter "
    "io_uring_register userfaultfd mount umount2 pivot_root unshare setns clone3 "
    "kexec_load kexec_file_load init_module finit_module delete_module reboot "
    "clock_settime clock_adjtime settimeofday adjtimex"
).split()
# Kernel AIO (issue 11): its contexts come from a host-wide pool.
AIO_SYSCALLS = "io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents".split()


def rules_for(syscall):
    return [r for r in RULES if r.syscall == syscall]


def denied_families():
    """Socket families 0..63 a rule denies whatever the protocol, as the kernel reads them."""
    denied = set()
    for rule in rules_for("socket"):
        if len(rule.args) != 1:
            continue
        (arg,) = rule.args
        if arg.op == CMP_MASKED_EQ:
            denied.add(arg.b)
        elif arg.op == CMP_GE:
            denied.update(range(arg.a, 64))
    return denied


class RuleTableTests(SynchronousTestCase):
    def test_required_syscalls_denied_unconditionally(self):
        """Every syscall the issue names has a rule with no argument condition."""
        for name in REQUIRED_DENIED:
            self.assertTrue([r for r in rules_for(name) if not r.args], name)

    def test_kernel_aio_denied_with_enosys(self):
        """Every kernel AIO syscall is denied outright with ENOSYS, as on a kernel
        without AIO (io_setup's contexts are a host-wide pool)."""
        for name in AIO_SYSCALLS:
            self.assertEqual([(r.errno, r.args) for r in rules_for(name)],
                             [(errno.ENOSYS, ())], name)

    def test_every_rule_says_why(self):
        """Each rule carries its reason."""
        for rule in RULES:
            self.assertTrue(rule.why, rule)

    def test_fallback_errnos(self):
        """clone3 and io_uring fail with ENOSYS (callers fall back), KSM opt-ins
        with EINVAL (as without KSM); others EPERM or an address-family error."""
        for rule in RULES:
            if (rule.syscall == "clone3" or rule.syscall.startswith("io_uring")
                    or rule.syscall in AIO_SYSCALLS):
                self.assertEqual(rule.errno, errno.ENOSYS)
            elif rule.syscall in ("madvise", "prctl"):
                self.assertEqual(rule.errno, errno.EINVAL)
            else:
                self.assertIn(rule.errno, (errno.EPERM, errno.EAFNOSUPPORT,
                                           errno.EPROTONOSUPPORT))

    def test_clone_namespace_bits(self):
        """clone with any CLONE_NEW* bit (user namespaces too) is denied, bit by bit."""
        bits = {rule.args[0].a for rule in rules_for("clone")}
        self.assertEqual(bits, set(seccomp.CLONE_NEW_FLAGS.values()))
        self.assertIn(0x10000000, bits)
        for rule in rules_for("clone"):
            (arg,) = rule.args
            self.assertEqual((arg.index, arg.op, arg.a), (0, CMP_MASKED_EQ, arg.b))

    def test_ioctl_requests_compared_on_32_bits(self):
        """TIOCSTI, TIOCLINUX and TIOCSETD match whatever the upper half of the
        request holds (the kernel reads an unsigned int)."""
        requests = set()
        for rule in rules_for("ioctl"):
            (arg,) = rule.args
            self.assertEqual((arg.index, arg.op, arg.a), (1, CMP_MASKED_EQ, LOW32))
            requests.add(arg.b)
        self.assertEqual(requests, {0x5412, 0x541C, 0x5423})

    def test_ksm_opt_ins_compared_on_32_bits(self):
        """Only madvise(MADV_MERGEABLE) and prctl(PR_SET_MEMORY_MERGE) are denied,
        whatever the upper half of the int argument holds."""
        self.assertEqual([r.args for r in rules_for("madvise")],
                         [(Arg(2, CMP_MASKED_EQ, LOW32, 12),)])
        self.assertEqual([r.args for r in rules_for("prctl")],
                         [(Arg(0, CMP_MASKED_EQ, LOW32, 67),)])

    def test_socket_families(self):
        """Only unix, inet, inet6 and netlink are left; packet and vsock are denied."""
        denied = denied_families()
        self.assertEqual(set(range(64)) - denied, {1, 2, 10, 16})
        self.assertIn(17, denied)  # AF_PACKET
        self.assertIn(40, denied)  # AF_VSOCK
        for rule in rules_for("socket"):
            if rule.args[0].op == CMP_MASKED_EQ:
                self.assertEqual(rule.args[0].a, LOW32)

    def test_netlink_route_only(self):
        """A netlink socket is denied unless its protocol is NETLINK_ROUTE."""
        (rule,) = [r for r in rules_for("socket") if len(r.args) == 2]
        family, protocol = rule.args
        self.assertEqual((family.index, family.b), (0, 16))
        self.assertEqual((protocol.index, protocol.op, protocol.a),
                         (2, seccomp.CMP_NE, 0))


class FilterBuildTests(SynchronousTestCase):
    def test_builds(self):
        """libseccomp accepts every rule of the table (built in memory, not loaded)."""
        built = Filter()
        built.release()
        built.release()  # idempotent

    def test_every_syscall_resolves(self):
        """Every syscall name in the table is known (to libseccomp or by number)."""
        built = Filter()
        try:
            for rule in RULES:
                self.assertGreaterEqual(built.syscall_number(rule.syscall), 0, rule)
        finally:
            built.release()

    def test_unknown_syscall_refused(self):
        """A rule naming no syscall fails the build instead of being skipped."""
        bad = (seccomp.Rule("no_such_syscall", errno.EPERM, (), "test"),)
        self.assertRaises(SeccompError, Filter, bad)
