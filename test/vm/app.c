/*
 * The app a VM test runs as `-- /bin/app-under-test ARGS`: prints one line with what it sees
 * (its argv and PID, the share on /z, the extra disk on /x, whether the OCI whiteouts were honoured, the host name and
 * eth0's address), then exits 7. With the argument `wait` it instead waits for SIGTERM, says
 * so, and exits 0. With `podcpu N` it sleeps N seconds and prints how much CPU PID 1 (the pod)
 * used meanwhile, then exits 0: a reaper with nothing to do should use none.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t term;
static void on_term(int sig) { (void)sig; term = 1; }

static void first_line(const char *path, char *buf, size_t n) {
	int fd = open(path, O_RDONLY);
	ssize_t r = fd >= 0 ? read(fd, buf, n - 1) : -1;
	if (fd >= 0) close(fd);
	buf[r > 0 ? r : 0] = 0;
	buf[strcspn(buf, "\n")] = 0;
	if (!buf[0]) snprintf(buf, n, "none");
}

static const char *eth0_address(char *buf, size_t n) {
	struct ifreq ifr = {0};
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	snprintf(ifr.ifr_name, IFNAMSIZ, "eth0");
	if (s < 0 || ioctl(s, SIOCGIFADDR, &ifr) < 0) snprintf(buf, n, "none");
	else inet_ntop(AF_INET, &((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr, buf, n);
	if (s >= 0) close(s);
	return buf;
}

/* utime + stime of PID 1 in clock ticks (fields 14 and 15 of /proc/1/stat), or -1. */
static long long pid1_cpu_ticks(void) {
	char buf[1024];
	first_line("/proc/1/stat", buf, sizeof buf);
	const char *p = strrchr(buf, ')'); /* comm may hold spaces: count fields after it */
	unsigned long long utime, stime;
	if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) return -1;
	return (long long)(utime + stime);
}

static long long monotonic_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
	if (argc > 2 && strcmp(argv[1], "podcpu") == 0) {
		long long t0 = monotonic_ms(), c0 = pid1_cpu_ticks();
		sleep((unsigned)atoi(argv[2]));
		long long t1 = monotonic_ms(), c1 = pid1_cpu_ticks();
		printf("APP-UNDER-TEST podcpu ticks=%lld hz=%ld elapsed_ms=%lld\n", c0 < 0 || c1 < 0 ? -1 : c1 - c0, sysconf(_SC_CLK_TCK), t1 - t0);
		fflush(stdout);
		return 0;
	}
	if (argc > 1 && strcmp(argv[1], "wait") == 0) {
		signal(SIGTERM, on_term);
		printf("APP-UNDER-TEST waiting for SIGTERM (pid %d)\n", getpid());
		fflush(stdout);
		while (!term) pause();
		printf("APP-UNDER-TEST got SIGTERM\n");
		fflush(stdout);
		return 0;
	}
	char share[128], disk[128], addr[64];
	struct utsname u;
	uname(&u);
	first_line("/z/hello.txt", share, sizeof share);
	first_line("/x/marker.txt", disk, sizeof disk);
	const char *whiteout = access("/etc/removed-by-layer2", F_OK) != 0 && access("/opaque/from-layer1", F_OK) != 0 && access("/opaque/from-layer2", F_OK) == 0 ? "ok" : "FAILED";
	printf("APP-UNDER-TEST pid=%d argv=[", getpid());
	for (int i = 1; i < argc; i++) printf("%s%s", i > 1 ? " " : "", argv[i]);
	printf("] share=%s disk=%s whiteouts=%s hostname=%s eth0=%s\n", share, disk, whiteout, u.nodename, eth0_address(addr, sizeof addr));
	fflush(stdout);
	return 7;
}
