// Kernel ABI numbers, kept apart from the bindings so boot logic can use them without loading C.

export const MS = {
  RDONLY: 0x1,
  NOSUID: 0x2,
  NODEV: 0x4,
  NOEXEC: 0x8,
  REMOUNT: 0x20,
  BIND: 0x1000,
  MOVE: 0x2000,
  REC: 0x4000,
  PRIVATE: 1 << 18,
} as const;

export const MNT_DETACH = 2;

export const RB = {
  AUTOBOOT: 0x01234567,
  POWER_OFF: 0x4321fedc,
  DISABLE_CAD: 0,
} as const;

export const FS_MAGIC = {
  RAMFS: 0x858458f6,
  TMPFS: 0x01021994,
} as const;

/** open(2) flags (asm-generic/fcntl.h), for opening a file someone less trusted wrote. */
export const O = {
  NOCTTY: 0o400,
  NONBLOCK: 0o4000,
  NOFOLLOW: 0o400000,
  CLOEXEC: 0o2000000,
} as const;
