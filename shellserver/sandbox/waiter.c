/*
 * shellserver-waiter: the two processes of a sandbox that only wait.
 *
 * Once a sandbox runs, its launcher (root, on the host) only waits for init
 * and then tears the session's cgroups down, and init (pid 1 of the sandbox)
 * only reaps until the console exits. Both were Python processes: forks of
 * the fork server's template, each with a few MB of private pages written by
 * its set-up. They exec this instead once their set-up is done, so a running
 * sandbox costs one interpreter (the console's), not three. The set-up itself
 * (namespaces, root, privileges, seccomp) stays in launcher.py.
 *
 *   shellserver-waiter init CONSOLE_PID
 *       pid 1: reap every child, exit with the console's status.
 *   shellserver-waiter launcher INIT_PID STATUS_FD [CGROUP_DIR...]
 *       wait for init; on SIGTERM/SIGHUP kill the cgroups (cgroup.kill);
 *       when init is gone, kill and remove the cgroups, write the exit
 *       status in decimal on STATUS_FD (-1: none), exit with it.
 *
 * Exit statuses are launcher.py's: init's is the console's exit code, or
 * 256 - signal when a signal ended it; the launcher's is init's exit code,
 * or 128 + signal. Built by shellserver.sandbox.runtime into the runtime's
 * libexec/, mode 0711: init runs it as the session's uid, and a file its
 * user cannot read keeps init undumpable across the exec (no /proc/1/mem
 * for the console, which has the same uid).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { SETUP_FAILED = 111, MAX_GROUPS = 16, PATH_BYTES = 4096 };

static char kill_paths[MAX_GROUPS][PATH_BYTES];
static int group_count;

static void usage(void)
{
    static const char text[] =
        "usage: shellserver-waiter init CONSOLE_PID\n"
        "       shellserver-waiter launcher INIT_PID STATUS_FD [CGROUP_DIR...]\n";
    (void)!write(2, text, sizeof text - 1);
    exit(2);
}

static long number(const char *text)
{
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end)
        usage();
    return value;
}

/* Async-signal-safe: open, write and close only, on paths made beforehand. */
static void kill_groups(void)
{
    for (int i = 0; i < group_count; i++) {
        int fd = open(kill_paths[i], O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            (void)!write(fd, "1", 1);
            close(fd);
        }
    }
}

/* The sandbox is ending: what is left of it runs only on spare CPU. */
static void yield_cpu(void)
{
    struct sched_param param = {0};
    sched_setscheduler(0, SCHED_IDLE, &param);
}

static void stop(int signum)
{
    (void)signum;
    kill_groups();
    yield_cpu();
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* rmdir each cgroup once it is empty, for up to two seconds. */
static void remove_groups(char **dirs, int count)
{
    int left = count;
    double deadline = now() + 2.0;
    while (left > 0 && now() < deadline) {
        for (int i = 0; i < count; i++) {
            if (dirs[i] && (rmdir(dirs[i]) == 0 || errno == ENOENT)) {
                dirs[i] = NULL;
                left--;
            }
        }
        if (left > 0) {
            struct timespec rest = {0, 5 * 1000 * 1000};
            nanosleep(&rest, NULL);
        }
    }
}

static int run_init(pid_t console)
{
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            return SETUP_FAILED;
        }
        if (pid == console) {
            if (WIFEXITED(status))
                return WEXITSTATUS(status);
            return WIFSIGNALED(status) ? (256 - WTERMSIG(status)) & 0xFF : 0;
        }
    }
}

static int run_launcher(pid_t init, int status_fd, char **dirs, int count)
{
    if (count > MAX_GROUPS)
        usage();
    for (int i = 0; i < count; i++) {
        int n = snprintf(kill_paths[i], PATH_BYTES, "%s/cgroup.kill", dirs[i]);
        if (n < 0 || n >= PATH_BYTES)
            usage();
    }
    group_count = count;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = stop;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGHUP, &action, NULL);
    /* launcher.py blocked both before the exec: one sent meanwhile is
       pending and runs the handler now. */
    sigset_t stops;
    sigemptyset(&stops);
    sigaddset(&stops, SIGTERM);
    sigaddset(&stops, SIGHUP);
    sigprocmask(SIG_UNBLOCK, &stops, NULL);

    int status;
    for (;;) {
        if (waitpid(init, &status, 0) == init)
            break;
        if (errno != EINTR) {
            status = SETUP_FAILED << 8;
            break;
        }
    }
    kill_groups();
    yield_cpu();
    remove_groups(dirs, count);
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
               : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 128;
    if (status_fd >= 0) {
        char text[8];
        int n = snprintf(text, sizeof text, "%d", code);
        (void)!write(status_fd, text, n);
        close(status_fd);
    }
    return code;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "init") == 0)
        return run_init((pid_t)number(argv[2]));
    if (argc >= 4 && strcmp(argv[1], "launcher") == 0)
        return run_launcher((pid_t)number(argv[2]), (int)number(argv[3]),
                            argv + 4, argc - 4);
    usage();
}
