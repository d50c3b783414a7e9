/*
 * The test root's /sbin/init: proves the handoff worked by printing one marker line with its
 * PID, its argv, which subvolume it runs from and whether /home is a separate mount, the uptime
 * at which it started and the memory then available (the benchmark reads both), then powers the
 * VM off. With an argument `hold=N` it first stays up N seconds (or until SIGTERM, SIGINT or
 * SIGUSR2), so a test can talk to whatever runs beside it; SIGINT (ctrl-alt-del, the sidecar's
 * `reboot` request) then reboots instead, as sysvinit and busybox init do. With an argument `ps` it first lists
 * every process that is not a kernel thread (what the initrd left running), one line each.
 * With an argument `hang` it plays an OS that froze (after `ps` and `hold=N`, if given): it stops
 * every other process (kill(-1, SIGSTOP): the agent's sidecar beside it too, and with it the
 * watchdog's petting), says so in one line, and never powers off.
 * With an argument `keys` it plays the OS's root looking for ssh host keys the initrd left: it
 * mounts the pool's top level (subvolid=5 of /dev/mapper/initos-pool0, as any root user can)
 * and prints every dropbear ed25519 private key file (by its header) under it (not inside the
 * @ subvolumes) and under /run, one line each with the file's bytes in hex:
 * "INITOS-TEST-ROOT key <path> <hex>", then "INITOS-TEST-ROOT keys end count=N pool=<yes|no>".
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { stop = sig; }

static void read_line(const char *path, char *buf, size_t n) {
	int fd = open(path, O_RDONLY);
	ssize_t r = fd >= 0 ? read(fd, buf, n - 1) : -1;
	if (fd >= 0) close(fd);
	buf[r > 0 ? r : 0] = 0;
	buf[strcspn(buf, "\n")] = 0;
	if (!buf[0]) snprintf(buf, n, "none");
}

/* MemAvailable from /proc/meminfo in kB, or -1. */
static long mem_available(void) {
	char buf[4096];
	int fd = open("/proc/meminfo", O_RDONLY);
	ssize_t r = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
	if (fd >= 0) close(fd);
	buf[r > 0 ? r : 0] = 0;
	char *p = strstr(buf, "MemAvailable:");
	return p ? strtol(p + 13, NULL, 10) : -1;
}

/*
 * "INITOS-TEST-ROOT ps pid=N ppid=N state=S comm=NAME" for every process but the kernel's
 * threads (PF_KTHREAD in /proc/<pid>/stat), then "INITOS-TEST-ROOT ps end count=N".
 */
static void dump_processes(void) {
	DIR *d = opendir("/proc");
	int count = 0;
	for (struct dirent *e; d && (e = readdir(d));) {
		if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
		char path[300], line[1024];
		snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
		read_line(path, line, sizeof line);
		/* "pid (comm) state ppid pgrp session tty tpgid flags ...": comm may hold spaces and parens */
		char *open = strchr(line, '('), *close = strrchr(line, ')');
		if (!open || !close || close < open) continue;
		char state = 0;
		int ppid = 0;
		unsigned long flags = 0;
		if (sscanf(close + 1, " %c %d %*d %*d %*d %*d %lu", &state, &ppid, &flags) != 3) continue;
		if (flags & 0x00200000) continue; /* PF_KTHREAD */
		*close = 0;
		printf("INITOS-TEST-ROOT ps pid=%s ppid=%d state=%c comm=%s\n", e->d_name, ppid, state, open + 1);
		count++;
	}
	if (d) closedir(d);
	printf("INITOS-TEST-ROOT ps end count=%d\n", count);
	fflush(stdout);
}

/*
 * "INITOS-SEEN root=/dev/mapper/initos-pool0 root-backing=vdb3 open=initos-pool0 btrfs=<fsid>":
 * the block device(s) under the root filesystem (the slaves of its device-mapper device, or the
 * device itself), every open LUKS volume by its device-mapper name, and the btrfs filesystems
 * the kernel knows. Attack scenarios read it to tell whose root runs (the victim's pool or a
 * disk of the attacker's) and whether any other pool is open beside it (readable to this
 * root). The root is /proc/self/mountinfo's last "/" entry (the root after switch_root).
 */
static void dm_name(const char *dm, char *out, size_t n) {
	char path[300];
	snprintf(path, sizeof path, "/sys/block/%s/dm/name", dm);
	read_line(path, out, n);
}

static void print_seen(void) {
	char source[256] = "none", backing[1024] = "", open[1024] = "", line[2048];
	FILE *f = fopen("/proc/self/mountinfo", "r");
	while (f && fgets(line, sizeof line, f)) {
		/* "id parent maj:min root mountpoint opts [optional...] - fstype source superopts" */
		char mnt[512], src[256];
		const char *dash = strstr(line, " - ");
		if (sscanf(line, "%*s %*s %*s %*s %511s", mnt) != 1 || strcmp(mnt, "/") != 0 || !dash) continue;
		if (sscanf(dash + 3, "%*s %255s", src) == 1) snprintf(source, sizeof source, "%s", src);
	}
	if (f) fclose(f);
	const char *base = strrchr(source, '/') ? strrchr(source, '/') + 1 : source;
	char rootdm[256] = "";
	DIR *d = opendir("/sys/block");
	for (struct dirent *e; d && (e = readdir(d));) {
		if (strncmp(e->d_name, "dm-", 3) != 0) continue;
		char name[128], uuid[256], path[300];
		dm_name(e->d_name, name, sizeof name);
		/* Only LUKS volumes (libcryptsetup's dm uuid "CRYPT-LUKS2-..."): not the verity images. */
		snprintf(path, sizeof path, "/sys/block/%s/dm/uuid", e->d_name);
		read_line(path, uuid, sizeof uuid);
		if (strncmp(uuid, "CRYPT-LUKS", 10) == 0)
			snprintf(open + strlen(open), sizeof open - strlen(open), "%s%s", open[0] ? "," : "", name);
		if (strcmp(base, e->d_name) == 0 || (strncmp(source, "/dev/mapper/", 12) == 0 && strcmp(base, name) == 0))
			snprintf(rootdm, sizeof rootdm, "%s", e->d_name);
	}
	if (d) closedir(d);
	if (rootdm[0]) {
		char path[300];
		snprintf(path, sizeof path, "/sys/block/%s/slaves", rootdm);
		DIR *s = opendir(path);
		for (struct dirent *e; s && (e = readdir(s));) {
			if (e->d_name[0] == '.') continue;
			snprintf(backing + strlen(backing), sizeof backing - strlen(backing), "%s%.200s", backing[0] ? "," : "", e->d_name);
		}
		if (s) closedir(s);
	} else {
		snprintf(backing, sizeof backing, "%s", base);
	}
	/* The btrfs filesystems the kernel knows (by fsid): whose pool(s) this root could reach. */
	char fsids[1024] = "";
	DIR *b = opendir("/sys/fs/btrfs");
	for (struct dirent *e; b && (e = readdir(b));) {
		if (e->d_name[0] == '.' || strcmp(e->d_name, "features") == 0) continue;
		snprintf(fsids + strlen(fsids), sizeof fsids - strlen(fsids), "%s%s", fsids[0] ? "," : "", e->d_name);
	}
	if (b) closedir(b);
	printf("INITOS-SEEN root=%s root-backing=%s open=%s btrfs=%s\n", source, backing[0] ? backing : "none", open[0] ? open : "none", fsids[0] ? fsids : "none");
	fflush(stdout);
}

/* dropbear's ed25519 private key file: string "ssh-ed25519", then string of 64 bytes (private, public). */
static const unsigned char DROPBEAR_ED25519[] = {0, 0, 0, 11, 's', 's', 'h', '-', 'e', 'd', '2', '5', '5', '1', '9', 0, 0, 0, 64};

static int scan_keys(const char *dir, int depth) {
	DIR *d = opendir(dir);
	int found = 0;
	for (struct dirent *e; d && (e = readdir(d));) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
		char path[512];
		snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
		struct stat st;
		if (lstat(path, &st) != 0) continue;
		if (S_ISDIR(st.st_mode)) {
			/* not the subvolumes (the OS's own files), nor the pool's mount point under /run again */
			if (depth > 0 && e->d_name[0] != '@' && strcmp(path, "/run/initos-test-pool") != 0) found += scan_keys(path, depth - 1);
			continue;
		}
		if (!S_ISREG(st.st_mode) || st.st_size > 4096) continue;
		unsigned char buf[4096];
		int fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
		ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf) : -1;
		if (fd >= 0) close(fd);
		if (n < (ssize_t)sizeof DROPBEAR_ED25519 || memcmp(buf, DROPBEAR_ED25519, sizeof DROPBEAR_ED25519) != 0) continue;
		printf("INITOS-TEST-ROOT key %s ", path);
		for (ssize_t i = 0; i < n; i++) printf("%02x", buf[i]);
		printf("\n");
		found++;
	}
	if (d) closedir(d);
	return found;
}

static void look_for_keys(void) {
	const char *top = "/run/initos-test-pool";
	mkdir(top, 0700);
	int pool = mount("/dev/mapper/initos-pool0", top, "btrfs", MS_RDONLY, "subvolid=5") == 0;
	if (!pool) printf("INITOS-TEST-ROOT keys: pool top level not mounted: %s\n", strerror(errno));
	int count = pool ? scan_keys(top, 3) : 0;
	if (pool && umount(top) != 0) printf("INITOS-TEST-ROOT keys: umount %s: %s\n", top, strerror(errno));
	count += scan_keys("/run", 4);
	printf("INITOS-TEST-ROOT keys end count=%d pool=%s\n", count, pool ? "yes" : "no");
	fflush(stdout);
}

int main(int argc, char **argv) {
	char root[64], timeline[8], up[64];
	struct stat st_root, st_home;
	read_line("/proc/uptime", up, sizeof up);
	up[strcspn(up, " ")] = 0;
	const char *home = stat("/home", &st_home) != 0 ? "none"
		: (stat("/", &st_root) == 0 && st_root.st_dev != st_home.st_dev) ? "mounted" : "same";
	read_line("/etc/initos-test-root", root, sizeof root);
	snprintf(timeline, sizeof timeline, "%s", access("/run/initos/boot.json", R_OK) == 0 ? "yes" : "no");
	printf("INITOS-TEST-ROOT pid=%d root=%s home=%s timeline=%s argc=%d argv=[", getpid(), root, home, timeline, argc);
	int hold = 0, ps = 0, hang = 0, keys = 0;
	for (int i = 1; i < argc; i++) {
		printf("%s%s", i > 1 ? " " : "", argv[i]);
		if (strncmp(argv[i], "hold=", 5) == 0) hold = atoi(argv[i] + 5);
		if (strcmp(argv[i], "ps") == 0) ps = 1;
		if (strcmp(argv[i], "hang") == 0) hang = 1;
		if (strcmp(argv[i], "keys") == 0) keys = 1;
	}
	/* RD_TIMESTAMP "<realtime usec> <monotonic usec>": when the initrd started, for systemd. */
	const char *rd = getenv("RD_TIMESTAMP");
	const char *mono = rd ? strchr(rd, ' ') : NULL;
	printf("] uptime=%s memavailable=%ldkB rd_monotonic_us=%s\n", up, mem_available(), mono ? mono + 1 : "none");
	fflush(stdout);
	print_seen();
	if (ps) dump_processes();
	if (keys) look_for_keys();
	if (hold > 0) {
		signal(SIGTERM, on_signal);
		signal(SIGINT, on_signal);
		signal(SIGUSR2, on_signal); /* busybox-style poweroff request */
		for (int i = 0; i < hold && !stop; i++) sleep(1);
		printf("INITOS-TEST-ROOT done holding: %s\n", stop == SIGINT ? "reboot" : "poweroff");
		fflush(stdout);
	}
	if (hang) {
		/* As PID 1, kill(-1) reaches every process but itself (kernel threads ignore it). */
		int r = kill(-1, SIGSTOP);
		printf("INITOS-TEST-ROOT hanging: %s\n", r == 0 ? "every other process stopped" : errno == ESRCH ? "no other process to stop" : strerror(errno));
		fflush(stdout);
		for (;;) pause();
	}
	sync();
	reboot(stop == SIGINT ? RB_AUTOBOOT : RB_POWER_OFF);
	return 0;
}
