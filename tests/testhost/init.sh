#!/bin/sh
# PID 1 of hearth's test host: a QEMU machine with emulated AMD SVM whose
# kernel (Debian's generic one) loads KVM, mounts this machine's root
# filesystem read-only over 9p with a tmpfs overlay, and runs one command
# chrooted into it. The command and its results live in the run directory,
# shared read-write at the same path. See docs/testing.md.
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
for m in $(busybox grep -v '^#' /modules.txt); do
    busybox insmod "/modules/$(busybox basename "$m").ko" || echo "testhost: insmod $m failed"
done
run=
for arg in $(busybox cat /proc/cmdline); do
    case "$arg" in hearth.run=*) run="${arg#hearth.run=}" ;; esac
done
fail() { echo "testhost: $*"; busybox poweroff -f; }
[ -n "$run" ] || fail "no hearth.run= on the command line"
[ -e /dev/kvm ] || fail "KVM did not come up (no /dev/kvm): is the CPU model missing svm?"
busybox mkdir -p /hostroot /upper /newroot
busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /hostroot || fail "cannot mount the host root over 9p"
busybox mount -t tmpfs -o size=75% upper /upper
busybox mkdir -p /upper/data /upper/work
busybox mount -t overlay -o lowerdir=/hostroot,upperdir=/upper/data,workdir=/upper/work overlay /newroot || fail "cannot mount the overlay root"
busybox mount -t proc proc /newroot/proc
busybox mount -t sysfs sys /newroot/sys
busybox mount -t devtmpfs dev /newroot/dev
busybox mkdir -p /newroot/dev/pts /newroot/dev/shm
busybox mount -t devpts devpts /newroot/dev/pts
busybox mount -t tmpfs shm /newroot/dev/shm
busybox mount -t tmpfs run /newroot/run
busybox mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
busybox mkdir -p "/newroot$run"
busybox mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hearthrun "/newroot$run" || fail "cannot mount the run directory"
busybox hostname hearth-testhost
# QEMU's user-mode network: this machine's network, through QEMU's NAT. Its
# resolver is whatever this machine's /etc/resolv.conf names (QEMU relays).
busybox ip link set lo up
if busybox ip link set eth0 up 2>/dev/null; then
    busybox ip addr add 10.0.2.15/24 dev eth0
    busybox ip route add default via 10.0.2.2
else
    echo "testhost: no eth0: suites that need the network will say so"
fi
echo "testhost: ready after $(busybox cut -d' ' -f1 /proc/uptime)s"
busybox chroot /newroot /bin/sh -c "cd '$run' && exec /bin/sh ./run.sh" </dev/console >/dev/console 2>&1
echo "$?" > "/newroot$run/status"
busybox sync
busybox umount "/newroot$run"
busybox poweroff -f
