#!/bin/sh
# Boots hearth's tuned kernel with the busybox boot initramfs and opens a
# shell on its console. Arguments: [vCPUs] [memory MiB].
set -eu
cd "$(dirname "$0")/.."
cache="${HEARTH_CACHE:-$HOME/.cache/hearth}"
kernel=$(ls -d "$cache"/kernel/*/vmlinux 2>/dev/null | head -n 1)
initramfs=$(ls "$cache"/initramfs/*/boot.cpio 2>/dev/null | head -n 1)
if [ -z "$kernel" ] || [ -z "$initramfs" ]; then
    echo "no kernel or initramfs in $cache: run \`cargo xtask setup\` first" >&2
    exit 1
fi
cargo build --quiet --release -p hearth-vmm
exec target/release/hearth-vmm --kernel "$kernel" --initramfs "$initramfs" \
    --cpus "${1:-2}" --memory "${2:-256}" --cmdline "hearth.shell"
