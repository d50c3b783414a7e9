// The seccomp profile of container jails, as data for the OCI runtime spec (linux.seccomp).
//
// A deny-list, not Docker's allow-list. A jail runs a whole OS image (its init, daemons, tools
// built against any glibc), not one app: an allow-list frozen here would answer EPERM to every
// syscall newer than it, which a distribution's libc does not always fall back from, and it
// would have to be kept in step with every image. What the allow-list buys in Docker comes
// mostly from two other places here: the user namespace (capable() checks against the host's
// namespace fail for module loading, kexec, swap, raw I/O, the clock...) and the capability
// set (no CAP_SYS_ADMIN, so no mount). So this list names what stays reachable *despite* them,
// and the privileged calls once more as a second wall should a capability check be wrong:
//
//   kernel modules   init_module finit_module delete_module create_module query_module
//                    get_kernel_syms                       (CAP_SYS_MODULE, host-wide)
//   kexec, reboot    kexec_load kexec_file_load reboot     (a jail's init that wants to stop
//                                                           just exits: the supervisor restarts it)
//   swap, accounting swapon swapoff acct quotactl quotactl_fd
//   the clock        settimeofday clock_settime clock_adjtime adjtimex stime (not namespaced)
//   raw I/O          iopl ioperm vm86 vm86old uselib lookup_dcookie nfsservctl
//   mounts           mount umount umount2 pivot_root fsopen fsconfig fsmount fspick move_mount
//                    open_tree mount_setattr — crun mounts the container's filesystems *before*
//                    it loads this filter (it is applied last, just before the execve of the
//                    jail's process), so the filter binds the jail and never crun
//   kernel keyring   keyctl add_key request_key (keys are not namespaced: one keyring per uid)
//   file handles     open_by_handle_at name_to_handle_at ("shocker": opens any inode of a
//                    filesystem by number, around the mount the jail sees)
//   attack surface   bpf perf_event_open userfaultfd io_uring_setup io_uring_enter
//   with no use      io_uring_register (each a steady source of kernel privilege escalations;
//   in a jail        userfaultfd stalls the kernel at will, which turns races into exploits)
//   kernel log       syslog (the kernel log holds the agent's lines and every jail's console)
//   nested userns    unshare and clone with CLONE_NEWUSER; clone3 answers ENOSYS so that libc
//                    falls back to clone, whose flags a filter can see (clone3 passes them in
//                    memory). A user namespace inside the jail would hand its processes every
//                    capability over new network and mount namespaces: nf_tables, unprivileged
//                    filesystem mounts, the source of most container-escape kernel bugs.
//                    The cost: bwrap, podman and systemd's PrivateUsers= do not work in a jail.
//
// Left allowed on purpose: ptrace and process_vm_* (the pid namespace confines them to the
// jail's own processes; debuggers work), and personality: its unsafe flags (ADDR_NO_RANDOMIZE,
// READ_IMPLIES_EXEC, ...) change only the caller's own layout, and the kernel clears them on a
// setuid execve (PER_CLEAR_ON_SETID).

const EPERM = 1;
const ENOSYS = 38;
const CLONE_NEWUSER = 0x10000000;

export interface SeccompRule {
  names: string[];
  action: "SCMP_ACT_ERRNO";
  errnoRet: number;
  args?: { index: number; value: number; valueTwo: number; op: "SCMP_CMP_MASKED_EQ" }[];
}

export interface SeccompProfile {
  defaultAction: "SCMP_ACT_ALLOW";
  /** The 32-bit and x32 ABIs too: otherwise a denied call is one int 0x80 away. */
  architectures: string[];
  syscalls: SeccompRule[];
}

/** Denied with EPERM, as a missing capability would be: software already handles that answer. */
export const DENIED_SYSCALLS: readonly string[] = [
  // kernel modules
  "init_module", "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms",
  // kexec, reboot
  "kexec_load", "kexec_file_load", "reboot",
  // swap, accounting, quotas
  "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
  // the clock
  "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime",
  // raw I/O and obsolete interfaces
  "iopl", "ioperm", "vm86", "vm86old", "uselib", "lookup_dcookie", "nfsservctl",
  // mounts (crun's are done before the filter applies)
  "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
  // the kernel keyring
  "keyctl", "add_key", "request_key",
  // file handles
  "open_by_handle_at", "name_to_handle_at",
  // attack surface with no use in a jail
  "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
  // the kernel log
  "syslog",
];

export function seccompProfile(): SeccompProfile {
  const newUser = [{ index: 0, value: CLONE_NEWUSER, valueTwo: CLONE_NEWUSER, op: "SCMP_CMP_MASKED_EQ" as const }];
  return {
    defaultAction: "SCMP_ACT_ALLOW",
    architectures: ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    syscalls: [
      { names: [...DENIED_SYSCALLS], action: "SCMP_ACT_ERRNO", errnoRet: EPERM },
      // Nested user namespaces. clone's flags are its first argument on x86_64 (and i386).
      { names: ["unshare", "clone"], action: "SCMP_ACT_ERRNO", errnoRet: EPERM, args: newUser },
      { names: ["clone3"], action: "SCMP_ACT_ERRNO", errnoRet: ENOSYS },
    ],
  };
}
