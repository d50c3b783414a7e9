// A UDP socket bound to one interface, for DHCP before the interface has an address: Node's
// dgram cannot bind to a device, and without that a broadcast has no route to leave by.
import { check } from "./ffi.ts";
import { libcCalls } from "./libc.ts";

const c = () => libcCalls;

const AF_INET = 2;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const SO_BROADCAST = 6;
const SO_BINDTODEVICE = 25;

function sockaddrIn(addr: string, port: number): Uint8Array {
  const b = Buffer.alloc(16);
  b.writeUInt16LE(AF_INET, 0);
  b.writeUInt16BE(port, 2);
  Buffer.from(addr.split(".").map(Number)).copy(b, 4);
  return b;
}

export interface UdpSocket {
  send(data: Uint8Array, addr: string, port: number): void;
  /** Datagrams waiting now (non-blocking). */
  receive(): Uint8Array[];
  close(): void;
}

export function udpOnDevice(ifname: string, port: number): UdpSocket {
  const SOCK_DGRAM = 2;
  const SOCK_NONBLOCK = 0o4000;
  const SOCK_CLOEXEC = 0o2000000;
  const fd = check("socket", ["AF_INET", "SOCK_DGRAM"], c().socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  const one = Buffer.alloc(4);
  one.writeInt32LE(1, 0);
  check("setsockopt", ["SO_REUSEADDR"], c().setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, one, 4));
  check("setsockopt", ["SO_BROADCAST"], c().setsockopt(fd, SOL_SOCKET, SO_BROADCAST, one, 4));
  const dev = Buffer.from(`${ifname}\0`);
  check("setsockopt", ["SO_BINDTODEVICE", ifname], c().setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, dev, dev.length));
  check("bind", [`0.0.0.0:${port}`], c().bind(fd, sockaddrIn("0.0.0.0", port), 16));
  return {
    send(data, addr, p) {
      check("sendto", [`${addr}:${p}`], Number(c().sendto(fd, data, data.length, 0, sockaddrIn(addr, p), 16)));
    },
    receive() {
      const out: Uint8Array[] = [];
      for (;;) {
        const buf = new Uint8Array(1500);
        const n = Number(c().recv(fd, buf, buf.length, 0));
        if (n <= 0) return out;
        out.push(buf.subarray(0, n));
      }
    },
    close: () => void c().close(fd),
  };
}
