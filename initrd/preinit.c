/*
 * preinit: the initrd's /init. Bun cannot start without /proc (JSC reads /proc/self/maps for
 * its stack bounds), so this mounts the three filesystems it needs, makes sure fds 0-2 exist,
 * and execs the agent, which stays PID 1. Everything else is the agent's job.
 */
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define AGENT "/usr/bin/initos-agent"

static void say(const char *msg) {
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) { write(fd, msg, __builtin_strlen(msg)); close(fd); }
}

int main(int argc, char **argv, char **envp) {
	(void)argc;
	mkdir("/proc", 0555); mkdir("/sys", 0555); mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	/* The kernel leaves fds 0-2 closed when it could not open /dev/console. */
	if (fcntl(0, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR | O_NOCTTY);
		if (fd >= 0) { dup2(fd, 0); dup2(fd, 1); dup2(fd, 2); if (fd > 2) close(fd); }
	}
	argv[0] = AGENT;
	execve(AGENT, argv, envp);
	say("<2>initos preinit: cannot exec " AGENT "\n");
	/* PID 1 must not exit: a panic with this line above it is the clearest report left. */
	for (;;) pause();
}
