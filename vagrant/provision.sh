#!/bin/bash
# Provisions one hastore lab node (Debian 12, as root). Shared by the Vagrant lab (vagrant/Vagrantfile) and the qemu
# lab (`hastore lab vm`, which runs it from the 9p share at /hastore/vagrant/provision.sh): the same steps configure
# both, so the two labs cannot drift apart. Every step is idempotent.
#
#   provision.sh package-list   print the guest packages (space separated; the qemu image is built with them)
#   provision.sh packages       apt-get install them
#   provision.sh configure      write /etc/drbd.d/r0.res (r1.res) and /etc/ha.d/{ha.cf,authkeys,haresources}
#   provision.sh drbd           create-md, up; on HASTORE_PRIMARY the first time, per resource: force primary,
#                               mkfs.ext4, then r0: MariaDB datadir (user lab/lab, database lab); r1: the export
#                               and NFS state directories; then Secondary again
#   provision.sh start          start `hastore run -c /etc/ha.d` in the background (log /var/log/hastore.log)
#
# Environment: HASTORE_NODE, HASTORE_PEER (node names = uname -n), HASTORE_NODE_ADDR, HASTORE_PEER_ADDR (replication
# and heartbeat IPv4 of this node and the peer), HASTORE_DISK (DRBD backing device), HASTORE_SERIAL (optional serial
# device for the heartbeat), HASTORE_LAN_IF (optional: the VIP's interface), HASTORE_VIP (a.b.c.d/nn), HASTORE_PING
# (ping node), HASTORE_PRIMARY (preferred node), HASTORE_SRC (the checkout, default /hastore),
# HASTORE_SYNC_TIMEOUT (seconds the primary waits for the initial sync when the peer is connected, default 300).
# The NFS example (a second group, preferred by the other node): HASTORE_NFS_DISK (its DRBD backing device; unset:
# no NFS group), HASTORE_NFS_VIP (a.b.c.d/nn), HASTORE_NFS_CLIENTS (who may mount, e.g. 192.168.56.0/24).
set -euo pipefail

PACKAGES="drbd-utils kmod iproute2 e2fsprogs procps iputils-ping iputils-arping python3 python3-serial busybox psmisc
util-linux mariadb-server mariadb-client python3-structlog python3-tenacity python3-pyudev
python3-pymysql nfs-kernel-server"
RES=r0                  # the MariaDB group's DRBD resource
DEVICE=/dev/drbd0
MOUNT=/data
DATADIR=$MOUNT/mysql
DRBD_PORT=7789
NFS_RES=r1              # the NFS group's
NFS_DEVICE=/dev/drbd1
NFS_MOUNT=/srv/nfs
NFS_EXPORT=$NFS_MOUNT/export
NFS_STATE=$NFS_MOUNT/state
NFS_PORT=7790
SRC=${HASTORE_SRC:-/hastore}
# Compiled bytecode goes here, not beside the sources: the qemu lab's checkout is a read-only 9p share, where Python
# would recompile every module in every process (each agent call: seconds under TCG).
PYC=/var/cache/hastore/pyc

need() {
  local v
  for v in "$@"; do
    [ -n "${!v:-}" ] || { echo "provision.sh: $v is not set" >&2; exit 2; }
  done
}

say() { echo "provision.sh [$(hostname)] $*"; }

packages() {
  export DEBIAN_FRONTEND=noninteractive
  # no service starts while installing (MariaDB runs on the DRBD device under hastore, never from /var/lib/mysql)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now mariadb nfs-server >/dev/null 2>&1 || true  # hastore starts them where their group runs
  fi
}

# The interface that holds an IPv4 address.
iface_of() { ip -o -4 addr show | awk -v a="$1" '{split($4, p, "/")} p[1] == a {print $2; exit}'; }

# drbd_res_file RES DEVICE DISK PORT
drbd_res_file() {
  cat > /etc/drbd.d/$1.res <<EOF
# written by hastore's vagrant/provision.sh
resource $1 {
  protocol C;
  device $2;
  disk $3;
  meta-disk internal;
  disk { c-plan-ahead 0; resync-rate 100M; }  # a fixed, fast resync: a lab disk syncs in seconds
  # DRBD notices a dead peer by its own pings (default every 10 s): until it does it refuses to promote here
  # ("Multiple primaries not allowed"), whatever hastore's heartbeat already knows. A ping after 1 s without
  # traffic (the least), and 300 ms for its answer (default 500 ms). hastore's drbd agent asks DRBD to promote as
  # soon as it starts, which makes DRBD ping the peer at once and wait ping-timeout + 0.1 s: in the VM lab the
  # survivor was then Primary 0.6 s after hastore declared the peer dead (0.8 s with 500 ms), where DRBD on its
  # own noticed up to 1.3 s after. ping-timeout 2 (200 ms) was tried: a node busy booting and resyncing under TCG
  # then lost its connection to a live peer; with 3, 5 power-offs and rejoins showed no such loss.
  net { ping-int 1; ping-timeout 3; }
  on $HASTORE_NODE { address $HASTORE_NODE_ADDR:$4; }
  on $HASTORE_PEER { address $HASTORE_PEER_ADDR:$4; }
}
EOF
}

# The NFS group's preferred node: the other one, so that each node runs a group when both are up.
nfs_primary() { [ "$HASTORE_PRIMARY" = "$HASTORE_NODE" ] && echo "$HASTORE_PEER" || echo "$HASTORE_NODE"; }

configure() {
  need HASTORE_NODE HASTORE_PEER HASTORE_NODE_ADDR HASTORE_PEER_ADDR HASTORE_DISK HASTORE_VIP HASTORE_PING \
       HASTORE_PRIMARY
  local repl_if vip
  repl_if=$(iface_of "$HASTORE_NODE_ADDR")
  [ -n "$repl_if" ] || { echo "provision.sh: no interface holds $HASTORE_NODE_ADDR" >&2; exit 1; }
  mkdir -p /etc/drbd.d /etc/ha.d
  drbd_res_file $RES $DEVICE "$HASTORE_DISK" $DRBD_PORT
  if [ -n "${HASTORE_NFS_DISK:-}" ]; then
    need HASTORE_NFS_VIP HASTORE_NFS_CLIENTS
    drbd_res_file $NFS_RES $NFS_DEVICE "$HASTORE_NFS_DISK" $NFS_PORT
  else
    rm -f /etc/drbd.d/$NFS_RES.res
  fi
  {
    echo "# written by hastore's vagrant/provision.sh"
    echo "keepalive 200ms"
    echo "warntime 500ms"
    echo "deadtime 1s"
    echo "initdead 30s"  # the nodes start one after the other (vagrant up, or the VM lab under TCG: 12 s apart seen)
    echo "udpport 694"
    echo "ucast $repl_if $HASTORE_PEER_ADDR"
    if [ -n "${HASTORE_SERIAL:-}" ]; then
      echo "serial $HASTORE_SERIAL"
      echo "baud 115200"
    fi
    echo "ping $HASTORE_PING"
    echo "auto_failback off"
    echo "node $HASTORE_PRIMARY"
    [ "$HASTORE_PRIMARY" = "$HASTORE_NODE" ] && echo "node $HASTORE_PEER" || echo "node $HASTORE_NODE"
  } > /etc/ha.d/ha.cf
  if [ ! -s /etc/ha.d/authkeys ]; then
    # both nodes must share the key: derive it from what both know (a lab, not a production secret)
    local key
    key=$(printf '%s' "hastore-lab:$HASTORE_VIP:$(printf '%s\n' "$HASTORE_NODE" "$HASTORE_PEER" | sort | tr '\n' :)" \
          | sha256sum | cut -c1-40)
    (umask 077; printf 'auth 1\n1 sha1 %s\n' "$key" > /etc/ha.d/authkeys)
  fi
  chmod 600 /etc/ha.d/authkeys
  vip=$HASTORE_VIP
  [ -n "${HASTORE_LAN_IF:-}" ] && vip="$vip/$HASTORE_LAN_IF"
  # Small VMs: a 32 MiB InnoDB buffer pool, and 1 MiB for the Aria page cache and the MyISAM key buffer (128 MiB
  # each by default, for tables the lab does not use: only MariaDB's own system tables are Aria). MariaDB sets the
  # caches up as it starts, before InnoDB: in the TCG guests the server was ready 1.6 s after its exec with the small
  # ones against 2.1 s (median of 5 starts each on a copy of the lab's datadir).
  {
    echo "$HASTORE_PRIMARY drbd::$RES Filesystem::$DEVICE::$MOUNT::ext4 IPaddr::$vip" \
         "mysql::$DATADIR::--innodb-buffer-pool-size=32M::--aria-pagecache-buffer-size=1M::--key-buffer-size=1M"
    if [ -n "${HASTORE_NFS_DISK:-}" ]; then
      vip=$HASTORE_NFS_VIP
      [ -n "${HASTORE_LAN_IF:-}" ] && vip="$vip/$HASTORE_LAN_IF"
      # nfsserver::STATE_DIR::PATH::CLIENT(OPTIONS): the export, with the NFS state kept on the shared disk
      echo "$(nfs_primary) drbd::$NFS_RES Filesystem::$NFS_DEVICE::$NFS_MOUNT::ext4 IPaddr::$vip" \
           "nfsserver::$NFS_STATE::$NFS_EXPORT::$HASTORE_NFS_CLIENTS(rw,sync,no_subtree_check,no_root_squash)"
    fi
  } > /etc/ha.d/haresources
  say "configured: r0 on $HASTORE_DISK${HASTORE_NFS_DISK:+, r1 on $HASTORE_NFS_DISK}, heartbeat on $repl_if" \
      "${HASTORE_SERIAL:+and $HASTORE_SERIAL}, VIP $HASTORE_VIP${HASTORE_NFS_DISK:+, NFS VIP $HASTORE_NFS_VIP}"
}

R=$RES  # the resource dstate, cstate, synced and connected_or_syncing look at
dstate() { drbdadm dstate $R 2>/dev/null || true; }
cstate() { drbdadm cstate $R 2>/dev/null || true; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local t=$1 what=$2 i=0
  shift 2
  until "$@"; do
    i=$((i + 1))
    [ $i -le $((t * 5)) ] || { echo "provision.sh: timed out waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}

synced() { [ "$(dstate)" = "UpToDate/UpToDate" ]; }
connected_or_syncing() { case "$(cstate)" in Connected | Sync* | PausedSync*) return 0 ;; *) return 1 ;; esac; }

drbd() {
  need HASTORE_NODE HASTORE_PEER HASTORE_PRIMARY
  modprobe drbd
  # Both resources are initialised on HASTORE_PRIMARY, the node provisioned first (Vagrant brings the nodes up one
  # after the other): the NFS group may start there before its preferred node exists, and then it finds its data.
  drbd_res $RES 0 "$HASTORE_PRIMARY" $DEVICE init_mysql
  if [ -n "${HASTORE_NFS_DISK:-}" ]; then
    drbd_res $NFS_RES 1 "$HASTORE_PRIMARY" $NFS_DEVICE init_nfs
  fi
}

# drbd_res RES MINOR INITIALISING_NODE DEVICE INIT: bring one resource up; initialise it there once
drbd_res() {
  local res=$1 minor=$2 preferred=$3 device=$4 init=$5 md mnt
  R=$res
  # Metadata is created only where there is none: after a power loss it is "unclean" and dump-md fails too, and
  # re-creating it would throw away what this node knows about its data (and force a full resync).
  if ! grep -q "^ *$minor: cs:" /proc/drbd && ! md=$(drbdadm dump-md $res 2>&1); then
    if echo "$md" | grep -q "No valid meta data found"; then
      drbdadm create-md --force $res
    else
      say "drbd: $res keeps its existing metadata ($(echo "$md" | grep -v '^$' | tail -1))"
    fi
  fi
  grep -q "^ *$minor: cs:" /proc/drbd || drbdadm up $res
  [ "$HASTORE_NODE" = "$preferred" ] || { say "drbd: $res up, $(dstate)"; return 0; }
  # Only metadata that never saw data (current UUID 4, UUID_JUST_CREATED) is initialised; anything else holds data
  # (a restarted node is Consistent or Outdated until it has talked to its peer: never force it).
  if ! drbdadm get-gi $res 2>/dev/null | grep -q '^0*4:'; then
    say "drbd: $res already initialised, $(cstate) $(dstate)"
    return 0
  fi
  # First time on the initialising node: the peer may not be up yet (Vagrant provisions one node after the other);
  # DRBD syncs it fully as soon as it connects.
  say "drbd: $res: initial sync from here ($(cstate), $(dstate))"
  mnt=$(mktemp -d)
  # shellcheck disable=SC2064 # expanded now, on purpose
  trap "init_failed $res $mnt" EXIT  # any failure (or exit) before the trap is cleared undoes the initialisation
  drbdadm primary --force $res
  mkfs.ext4 -q -F $device
  mount $device $mnt
  $init $mnt
  umount $mnt
  rmdir $mnt
  trap - EXIT
  if connected_or_syncing; then
    wait_for "${HASTORE_SYNC_TIMEOUT:-300}" "the initial sync of $res" synced
  fi
  drbdadm secondary $res
  say "drbd: $res initialised, $(cstate) $(dstate)"
}

# A first-time initialisation that failed half-way: unmount, demote and reset the metadata, so that the resource
# is "just created" again and a rerun of the drbd step starts over (instead of calling it initialised).
init_failed() {
  umount "$2" 2>/dev/null || true
  rmdir "$2" 2>/dev/null || true
  drbdadm secondary "$1" 2>/dev/null || true
  drbdadm down "$1" 2>/dev/null || true
  drbdadm create-md --force "$1" >/dev/null 2>&1 || true
  drbdadm up "$1" 2>/dev/null || true
  echo "provision.sh: initialising $1 failed; it was reset: run the drbd step again" >&2
}

init_mysql() {  # init_mysql MOUNTPOINT: MariaDB's datadir, user lab/lab, database lab
  local datadir=$1/${DATADIR#"$MOUNT"/}
  mkdir -p $datadir
  chown mysql:mysql $datadir
  mariadb-install-db --user=mysql --datadir=$datadir --auth-root-authentication-method=socket \
    --skip-test-db >/dev/null
  mariadbd --bootstrap --user=mysql --datadir=$datadir --skip-networking >/tmp/hastore-bootstrap.log 2>&1 <<'EOF' \
    || { tail -5 /tmp/hastore-bootstrap.log >&2; exit 1; }
FLUSH PRIVILEGES;
CREATE DATABASE IF NOT EXISTS lab;
CREATE USER IF NOT EXISTS 'lab'@'%' IDENTIFIED BY 'lab';
GRANT ALL ON lab.* TO 'lab'@'%';
CREATE TABLE IF NOT EXISTS lab.writes (id INT PRIMARY KEY, node VARCHAR(64), t DOUBLE);
EOF
}

init_nfs() {  # init_nfs MOUNTPOINT: the exported directory (writable by all) and the NFS state directory
  mkdir -p "$1/${NFS_EXPORT#"$NFS_MOUNT"/}" "$1/${NFS_STATE#"$NFS_MOUNT"/}"
  chmod 1777 "$1/${NFS_EXPORT#"$NFS_MOUNT"/}"
}

# `hastore status`, `hastore standby`, ... on the node run the checkout's code, like the daemon.
install_cli() {
  printf '#!/bin/sh\nPYTHONPATH=%s PYTHONPYCACHEPREFIX=%s exec python3 -m hastore "$@"\n' "$SRC" "$PYC" \
    > /usr/local/bin/hastore
  chmod 755 /usr/local/bin/hastore
}

start() {
  install_cli
  mkdir -p $PYC
  # compile once now rather than in the first failover's agent calls
  PYTHONPYCACHEPREFIX=$PYC python3 -m compileall -q "$SRC/hastore" >/dev/null || true
  local pidfile=/run/hastore-provision.pid
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl is-active --quiet hastore-lab && { say "hastore already running"; return 0; }
    systemd-run --unit=hastore-lab --setenv=PYTHONPATH="$SRC" --setenv=PYTHONPYCACHEPREFIX=$PYC \
      /bin/sh -c "exec python3 -m hastore run -c /etc/ha.d >>/var/log/hastore.log 2>&1"
  else
    if [ -s $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null; then
      say "hastore already running (pid $(cat $pidfile))"
      return 0
    fi
    PYTHONPATH="$SRC" PYTHONPYCACHEPREFIX=$PYC setsid nohup python3 -m hastore run -c /etc/ha.d >>/var/log/hastore.log 2>&1 </dev/null &
    echo $! > $pidfile
  fi
  say "hastore started (log /var/log/hastore.log)"
}

case "${1:-}" in
  package-list) echo $PACKAGES ;;
  packages) packages ;;
  configure) configure ;;
  drbd) drbd ;;
  start) start ;;
  *) echo "usage: provision.sh package-list|packages|configure|drbd|start" >&2; exit 2 ;;
esac
