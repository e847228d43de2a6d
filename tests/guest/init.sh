#!/bin/sh
# PID 1 of the minimal boot initramfs (busybox): used by the boot suite, the
# boot benchmark and the demo until the agent (guest-runtime/) takes over.
# It reports what the guest sees as `HEARTH-<FACT>: value` lines on the
# console, then ends the VM with a reboot (hearth's kernel runs with
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
case " $(busybox cat /proc/cmdline) " in
    *" hearth.shell "*) busybox sh ;;
esac
echo "HEARTH-DONE: rebooting"
busybox reboot -f
