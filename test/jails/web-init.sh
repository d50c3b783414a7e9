#!/bin/sh
# The test jail's init (PID 1 of its own pid namespace): says what it sees, eats memory past its
# limit on its first run (the share remembers), then serves HTTP on 8080 until SIGTERM.
trap 'echo "JAIL-TERM"; exit 0' TERM
echo "JAIL-UP pid=$$ uid=$(id -u) hostname=$(hostname) procs=$(ls -d /proc/[0-9]* | wc -l)"
# The host's disks, the pool's top level and other jails must not be reachable from here.
echo "JAIL-DEV $(ls /dev | tr '\n' ' ')"
echo "JAIL-POOL $(ls / | tr '\n' ' ')| $(cat /proc/self/mountinfo | grep -c btrfs) btrfs mounts: $(grep btrfs /proc/self/mountinfo | awk '{print $4 "->" $5}' | tr '\n' ' ')"
if [ ! -e /data/ran-once ]; then
  echo first > /data/ran-once && echo "JAIL-SHARE wrote /data/ran-once"
  echo "JAIL-HOG allocating past the memory limit"
  x=$(head -c 300000000 /dev/zero | tr '\0' a)
  echo "JAIL-HOG survived ${#x} bytes"
fi
httpd -p 8080 -h /www
echo "JAIL-SERVING on 8080"
while :; do sleep 1; done
