#!/usr/bin/env bash
# Build a small Debian 12 guest with systemd and only the cgroup2 hierarchy,
# with shellserver installed the README's way, for tests/vm (run as root).
#
#   tests/vm/build_image.sh base          debootstrap and install, cached
#   tests/vm/build_image.sh image OUT     the base plus this work tree's
#                                         source, as a raw ext4 image at OUT
#
# The base (a root directory, the guest's ssh key) is cached outside the
# repository in $SHELLSERVER_VM_CACHE (default /var/cache/shellserver-vm),
# keyed by a hash of what goes into it: a second run reuses it. Installing
# happens from the host side in a chroot: inside the emulated guest it takes
# ten times longer. Prints the directory of the base on stdout.
set -euo pipefail

here=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
cache=${SHELLSERVER_VM_CACHE:-/var/cache/shellserver-vm}
mirror=${SHELLSERVER_VM_MIRROR:-http://deb.debian.org/debian}
say() { printf '==> %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "build_image.sh: run as root (debootstrap and chroot need it)" >&2
  exit 1
fi

# The guest's packages: systemd and the distribution kernel, ssh for the
# tests, and what setup.sh would install (so that it finds them present).
packages=systemd,systemd-sysv,udev,dbus,linux-image-amd64,openssh-server,iproute2,procps,
packages+=python3,python3-venv,python3-dev,ca-certificates,rsync,gcc,libc6-dev
# The base is keyed by what debootstrap and the guest's configuration put in
# it; bump the recipe when build_base changes. The project itself is
# (re)installed on top at every `image` with setup.sh, which skips what is
# already done, so a change to pyproject.toml or setup.sh needs no new base.
recipe=2
key=$(printf '%s\n' "$recipe" "$packages" "$mirror" | sha256sum | cut -c1-16)
base=$cache/base-$key
root=$base/rootfs

unmount_chroot() {
  for m in opt/wheels opt/pypi opt/pypi-more dev/pts dev sys proc; do
    mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m" || true
  done
}

build_base() {
  root=$base.partial/rootfs
  # A build killed halfway may have left the host's /dev bound inside: never
  # let rm follow it.
  unmount_chroot
  rm -rf --one-file-system "$base.partial"
  mkdir -p "$cache" "$base.partial"
  trap unmount_chroot EXIT
  say "debootstrap bookworm into $root (about 3 minutes)"
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
    > "$base.partial/debootstrap.log" 2>&1 || {
      tail -n 30 "$base.partial/debootstrap.log" >&2; exit 1; }

  say "configuring the guest"
  echo shellserver-vm > "$root/etc/hostname"
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
  # qemu's user-mode network: a fixed address is quicker than DHCP.
  cat > "$root/etc/systemd/network/10-qemu.network" <<'NET'
[Match]
Name=en* eth*
[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
NET
  chroot "$root" systemctl enable systemd-networkd >/dev/null 2>&1
  chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
  # The tests log in as root with a key made for this image only.
  ssh-keygen -q -t ed25519 -N '' -C shellserver-vm -f "$base.partial/id_ed25519"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$base.partial/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
  # The host's certificate authorities and package settings, so that pip,
  # npm and apt reach the registries from the chroot as they do here.
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
  [ -f /root/.npmrc ] && cp /root/.npmrc "$root/root/.npmrc"

  install_project
  trap - EXIT
  mv "$base.partial" "$base"
  root=$base/rootfs
}

# The work tree into /opt/shellserver, then `./setup.sh install` there in a
# chroot (the README's way; it installs only what is missing).
install_project() {
  say "installing shellserver in the chroot the README's way (./setup.sh install)"
  trap unmount_chroot EXIT
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mount -t sysfs sys "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  for d in /opt/wheels /opt/pypi /opt/pypi-more; do
    if [ -d "$d" ]; then mkdir -p "$root$d"; mount --bind -o ro "$d" "$root$d"; fi
  done
  copy_source "$root"
  local log=$cache/install.log
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    /opt/shellserver/setup.sh install > "$log" 2>&1 || {
      tail -n 40 "$log" >&2; unmount_chroot; exit 1; }
  for d in opt/wheels opt/pypi opt/pypi-more; do
    mountpoint -q "$root/$d" && umount "$root/$d" && rmdir "$root/$d" 2>/dev/null || true
  done
  umount "$root/dev/pts" "$root/dev" "$root/sys" "$root/proc"
  echo 'nameserver 10.0.2.3' > "$root/etc/resolv.conf"
  trap - EXIT
}

# The work tree's files (tracked and new, not ignored) into /opt/shellserver.
copy_source() {
  local target=$1/opt/shellserver
  mkdir -p "$target"
  (cd "$here" && git ls-files -z --cached --others --exclude-standard) |
    rsync -a --from0 --files-from=- "$here/" "$target/"
}

# One build at a time: the cached root is updated in place.
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
[ -d "$base" ] || build_base
case "${1:-base}" in
  base) ;;
  image)
    out=${2:?usage: build_image.sh image OUT}
    install_project
    # The unit and the configuration the README installs.
    install -m 0644 "$root/opt/shellserver/etc/shellserver.service" \
      "$root/etc/systemd/system/shellserver.service"
    install -d "$root/etc/shellserver"
    install -m 0644 "$root/opt/shellserver/etc/shellserver.toml" \
      "$root/etc/shellserver/shellserver.toml"
    rm -f "$out"
    mkfs.ext4 -q -F -L shellserver-vm -d "$root" "$out" 8G
    ;;
  *) echo "usage: $0 base | image OUT" >&2; exit 2 ;;
esac
echo "$base"
