/*
 * preinit: the initrd's /init. Bun cannot start without /proc (JSC reads /proc/self/maps for
 * its stack bounds), so this mounts the three filesystems it needs, makes sure fds 0-2 exist,
 * and execs the agent, which stays PID 1. Everything else is the agent's job.
 *
 * It also notes when the initrd started, as RD_TIMESTAMP="<realtime usec> <monotonic usec>" in
 * the environment (dracut's convention): the agent hands its environment to the root's init,
 * and systemd reads it to report the initrd's share of the boot (systemd-analyze).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>

#define AGENT "/usr/bin/initos-agent"

extern char **environ;

static void say(const char *msg) {
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) { write(fd, msg, __builtin_strlen(msg)); close(fd); }
}

static unsigned long long usec(clockid_t clock) {
	struct timespec t;
	clock_gettime(clock, &t);
	return (unsigned long long)t.tv_sec * 1000000ULL + (unsigned long long)t.tv_nsec / 1000ULL;
}

int main(int argc, char **argv) {
	(void)argc;
	char stamp[64];
	snprintf(stamp, sizeof stamp, "%llu %llu", usec(CLOCK_REALTIME), usec(CLOCK_MONOTONIC));
	setenv("RD_TIMESTAMP", stamp, 0);
	mkdir("/proc", 0555); mkdir("/sys", 0555); mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	/* The kernel leaves fds 0-2 closed when it could not open /dev/console. */
	if (fcntl(0, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR | O_NOCTTY);
		if (fd >= 0) { dup2(fd, 0); dup2(fd, 1); dup2(fd, 2); if (fd > 2) close(fd); }
	}
	/* What the unpacked initramfs holds (make bench: its peak RAM is this plus the initrd image). */
	struct statfs fs;
	if (statfs("/", &fs) == 0 && fs.f_blocks > 0) { /* tmpfs; ramfs counts nothing */
		char line[96];
		snprintf(line, sizeof line, "<6>initos preinit: initramfs %llu kB\n", (unsigned long long)(fs.f_blocks - fs.f_bfree) * fs.f_bsize / 1024);
		say(line);
	}
	argv[0] = AGENT;
	execve(AGENT, argv, environ);
	say("<2>initos preinit: cannot exec " AGENT "\n");
	/* PID 1 must not exit: a panic with this line above it is the clearest report left. */
	for (;;) pause();
}
