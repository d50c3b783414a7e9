/*
 * initos pod: PID 1 of a VM that runs one app "like a pod" (vm mode, `-- app args` on the
 * kernel command line). The agent execs it after switch_root, so the agent's ~110 MB leave
 * memory while the app runs. It
 *   - starts the app (its own session, signals unblocked),
 *   - forwards SIGTERM/SIGINT/SIGPWR and the ACPI power button (QEMU `system_powerdown`,
 *     cloud-hypervisor's power-button) to the app as SIGTERM, then SIGKILL after a grace time,
 *   - reaps every zombie (orphans are reparented to PID 1),
 *   - when the app exits: logs its exit code, stops what is left, syncs, powers off.
 * Lines go to /dev/kmsg (and the console when there is no kmsg).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_BUTTONS 4
#define GRACE_SECONDS 10

static int kmsg = -1;

static void say(const char *fmt, ...) {
	char line[512];
	int n = snprintf(line, sizeof line, "<5>initos-pod: ");
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof line - 2) n = sizeof line - 2;
	line[n++] = '\n';
	if (kmsg < 0 || write(kmsg, line, n) < 0) {
		if (write(2, line + 3, n - 3) < 0) { /* nowhere left to say it */ }
	}
}

/* Event devices named "Power Button": the ACPI button driver's, fed by the VMM's power-down. */
static int open_power_buttons(int *fds) {
	int n = 0;
	DIR *d = opendir("/dev/input");
	if (!d) return 0;
	for (struct dirent *e; (e = readdir(d)) && n < MAX_BUTTONS;) {
		if (strncmp(e->d_name, "event", 5) != 0) continue;
		char path[300], name[128] = "";
		snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
		int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0) continue;
		if (ioctl(fd, EVIOCGNAME(sizeof name - 1), name) >= 0 && strstr(name, "Power Button")) fds[n++] = fd;
		else close(fd);
	}
	closedir(d);
	return n;
}

static int power_pressed(int fd) {
	struct input_event ev[16];
	ssize_t r = read(fd, ev, sizeof ev);
	for (ssize_t i = 0; r > 0 && i < r / (ssize_t)sizeof ev[0]; i++)
		if (ev[i].type == EV_KEY && ev[i].code == KEY_POWER && ev[i].value == 1) return 1;
	return 0;
}

static long long now_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* What is left after the app: asked to stop, then killed, then reaped; then power off. */
static void power_off(void) {
	kill(-1, SIGTERM);
	for (int i = 0; i < 20 && waitpid(-1, NULL, WNOHANG) >= 0; i++) usleep(100000);
	kill(-1, SIGKILL);
	while (waitpid(-1, NULL, WNOHANG) > 0) {}
	sync();
	reboot(RB_POWER_OFF);
	for (;;) pause(); /* PID 1 must never exit: that is a kernel panic */
}

int main(int argc, char **argv) {
	kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (argc < 2) {
		say("usage: pod APP [ARGS...]");
		power_off();
	}
	sigset_t handled, none;
	sigemptyset(&none);
	sigemptyset(&handled);
	static const int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGPWR, SIGHUP};
	for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaddset(&handled, sigs[i]);
	sigprocmask(SIG_BLOCK, &handled, NULL);
	int sfd = signalfd(-1, &handled, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0) say("signalfd: %s; looking for exits once a second", strerror(errno));

	int buttons[MAX_BUTTONS];
	int nbuttons = open_power_buttons(buttons);

	pid_t app = fork();
	if (app == 0) {
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		execv(argv[1], argv + 1);
		say("cannot run %s: %s", argv[1], strerror(errno));
		_exit(127);
	}
	if (app < 0) {
		say("cannot start %s: %s", argv[1], strerror(errno));
		power_off();
	}
	say("started %s (pid %d)%s", argv[1], app, nbuttons ? "; power button forwards SIGTERM" : "");

	long long deadline = 0; /* when the app gets SIGKILL once asked to stop (monotonic ms); 0: none */
	int stopping = 0;
	for (;;) {
		struct pollfd p[1 + MAX_BUTTONS] = {{.fd = sfd, .events = POLLIN}};
		for (int i = 0; i < nbuttons; i++) p[1 + i] = (struct pollfd){.fd = buttons[i], .events = POLLIN};
		/* Block until a signal or a button press; only a pending SIGKILL sets a timeout. (A
		 * timeout of 0 here kept PID 1 on a CPU for the whole life of the VM.) */
		int timeout = -1;
		if (deadline) {
			long long left = deadline - now_ms();
			timeout = left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int)left;
		}
		if (sfd < 0 && (timeout < 0 || timeout > 1000)) timeout = 1000; /* no signal wakes us */
		poll(p, 1 + nbuttons, timeout);

		int stop = 0;
		struct signalfd_siginfo si;
		while (read(sfd, &si, sizeof si) == sizeof si) {
			if (si.ssi_signo != SIGCHLD) stop = (int)si.ssi_signo;
		}
		for (int i = 0; i < nbuttons; i++) {
			if ((p[1 + i].revents & POLLIN) && power_pressed(buttons[i])) stop = -1;
			/* A button that went away would wake every poll at once: stop watching it. */
			if (p[1 + i].revents & (POLLERR | POLLHUP | POLLNVAL)) buttons[i] = -1;
		}
		if (stop && !stopping) {
			say("%s: sending SIGTERM to the app", stop < 0 ? "power button" : strsignal(stop));
			kill(app, SIGTERM);
			stopping = 1;
			deadline = now_ms() + GRACE_SECONDS * 1000;
		} else if (deadline && now_ms() >= deadline) {
			say("the app did not stop within %ds: SIGKILL", GRACE_SECONDS);
			kill(app, SIGKILL);
			deadline = 0; /* nothing more to time: its exit wakes the poll (SIGCHLD) */
		}

		int status;
		for (pid_t pid; (pid = waitpid(-1, &status, WNOHANG)) > 0;) {
			if (pid != app) continue; /* an orphan: reaped, nothing else to do */
			if (WIFEXITED(status)) say("app exited with %d", WEXITSTATUS(status));
			else say("app killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
			power_off();
		}
	}
}
