#!/bin/sh
# The lab guest's system setup, baked into the image as /etc/hastore-init and run once by busybox init
# (sysinit).  Everything node-specific comes from the kernel command line:
#   hastore.node=NAME hastore.lan=ADDR/NN hastore.gw=ADDR hastore.repl=ADDR/NN hastore.hosts=name=addr,...
# Then busybox init respawns the command server from the 9p share (see hastore/lab/vm/image.py: inittab).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t debugfs debugfs /sys/kernel/debug  # as systemd does: the drbd agent reads DRBD's minors there
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
mount -o remount,size=90% /
mkdir -p /run/lock /run/mysqld /hastore /data
chown mysql:mysql /run/mysqld 2>/dev/null

NODE=guest LAN= GW= REPL= HOSTS=
for word in $(cat /proc/cmdline); do
  case "$word" in
    hastore.node=*) NODE=${word#*=} ;;
    hastore.lan=*) LAN=${word#*=} ;;
    hastore.gw=*) GW=${word#*=} ;;
    hastore.repl=*) REPL=${word#*=} ;;
    hastore.hosts=*) HOSTS=${word#*=} ;;
  esac
done
hostname "$NODE"
echo "$NODE" > /etc/hostname
{ echo "127.0.0.1 localhost"
  [ -n "$GW" ] && echo "$GW gateway"
  for h in $(echo "$HOSTS" | tr , ' '); do echo "${h#*=} ${h%%=*}"; done; } > /etc/hosts
# No DNS in the lab: a lookup must fail at once, not time out (MariaDB looks up every client's address).
: > /etc/resolv.conf

for m in virtio_pci virtio_net virtio_blk virtio_console 9pnet_virtio 9p drbd ext4 nfsd; do modprobe "$m"; done
i=0
while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
[ -n "$LAN" ] && ip addr add "$LAN" dev eth0 && ip link set eth0 up
[ -n "$GW" ] && ip route add default via "$GW"
[ -n "$REPL" ] && ip addr add "$REPL" dev eth1 && ip link set eth1 up
stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=none hastore /hastore
echo "hastore-init: $NODE up (lan $LAN, repl $REPL)" > /dev/console
