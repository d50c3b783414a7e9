/*
 * sigrelay: lets the agent see signals that the JavaScript runtime has claimed for itself.
 *
 * JavaScriptCore uses SIGPWR to suspend its own threads (measured: Bun's SigCgt has bit 30 set,
 * and Bun clears an inherited SIGPWR block at startup), so Bun can neither listen for SIGPWR nor
 * have it blocked for a signalfd. Yet SIGPWR sent to PID 1 (a UPS daemon, an admin) means
 * "power is failing: shut down". This handler tells the two apart: signals the process sends
 * to its own threads (pthread_kill: SI_TKILL from our own pid) go on to the runtime's handler;
 * signals from other processes are written, one byte each, to a pipe the agent reads.
 * Everything in the handler is async-signal-safe.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static struct sigaction previous[NSIG];
static int relay_fd[NSIG];

static void chain(int sig, siginfo_t *si, void *uc) {
	struct sigaction *p = &previous[sig];
	if (p->sa_flags & SA_SIGINFO) {
		if (p->sa_sigaction) p->sa_sigaction(sig, si, uc);
	} else if (p->sa_handler != SIG_DFL && p->sa_handler != SIG_IGN) {
		p->sa_handler(sig);
	}
}

static void handler(int sig, siginfo_t *si, void *uc) {
	int saved = errno;
	if (si && si->si_code == SI_TKILL && si->si_pid == getpid()) {
		chain(sig, si, uc);
	} else {
		unsigned char b = (unsigned char)sig;
		(void)!write(relay_fd[sig], &b, 1);
	}
	errno = saved;
}

/* Relays `sig` from other processes to `fd`; returns 0 or -errno. */
int initos_relay_signal(int sig, int fd) {
	if (sig <= 0 || sig >= NSIG) return -EINVAL;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = handler;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	relay_fd[sig] = fd;
	if (sigaction(sig, &sa, &previous[sig]) < 0) return -errno;
	return 0;
}
