/*
 * The test root's /sbin/init: proves the handoff worked by printing one marker line with its
 * PID, its argv, which subvolume it runs from and whether /home is a separate mount, then
 * powers the VM off.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

static void read_line(const char *path, char *buf, size_t n) {
	int fd = open(path, O_RDONLY);
	ssize_t r = fd >= 0 ? read(fd, buf, n - 1) : -1;
	if (fd >= 0) close(fd);
	buf[r > 0 ? r : 0] = 0;
	buf[strcspn(buf, "\n")] = 0;
	if (!buf[0]) snprintf(buf, n, "none");
}

int main(int argc, char **argv) {
	char root[64], timeline[8];
	struct stat st_root, st_home;
	const char *home = stat("/home", &st_home) != 0 ? "none"
		: (stat("/", &st_root) == 0 && st_root.st_dev != st_home.st_dev) ? "mounted" : "same";
	read_line("/etc/initos-test-root", root, sizeof root);
	snprintf(timeline, sizeof timeline, "%s", access("/run/initos/boot.json", R_OK) == 0 ? "yes" : "no");
	printf("INITOS-TEST-ROOT pid=%d root=%s home=%s timeline=%s argc=%d argv=[", getpid(), root, home, timeline, argc);
	for (int i = 1; i < argc; i++) printf("%s%s", i > 1 ? " " : "", argv[i]);
	printf("]\n");
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
