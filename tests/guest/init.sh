#!/bin/sh
# PID 1 of the minimal boot initramfs (busybox): used by the boot suite, the
# boot benchmark and the demo until the agent (guest-runtime/) takes over.
# It reports what the guest sees as `HEARTH-<FACT>: value` lines on the
# console, runs a script from a disk if asked (hearth.run=), then ends the
# VM with a reboot (hearth's kernel runs with
# reboot=k, which the VMM's i8042 turns into an orderly exit).
echo "HEARTH-INIT: reached"
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
echo "HEARTH-UNAME: $(busybox uname -r)"
echo "HEARTH-CPUS-ONLINE: $(busybox cat /sys/devices/system/cpu/online)"
echo "HEARTH-NPROC: $(busybox nproc)"
echo "HEARTH-MEMTOTAL-KB: $(busybox awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo "HEARTH-UPTIME: $(busybox cut -d' ' -f1 /proc/uptime)"
run=
for arg in $(busybox cat /proc/cmdline); do
    case "$arg" in
        hearth.run=*) run="${arg#hearth.run=}" ;;
        hearth.shell) busybox sh ;;
    esac
done
# hearth.run=DEVICE: mount that ext4 disk and run its run.sh (the e2e
# suites' way of running a script in the guest), then report its status.
if [ -n "$run" ]; then
    busybox mkdir -p /run/hearth
    if busybox mount -t ext4 "$run" /run/hearth; then
        (cd /run/hearth && busybox sh ./run.sh)
        echo "HEARTH-RUN-EXIT: $?"
        busybox umount /run/hearth
    else
        echo "HEARTH-RUN-EXIT: cannot mount $run"
    fi
fi
echo "HEARTH-DONE: rebooting"
busybox reboot -f
