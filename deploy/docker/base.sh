#!/usr/bin/env bash
# The local base image, firstmile/debian-base:bookworm: a Debian 12 rootfs made with debootstrap and
# `docker import`ed, because no image registry is reachable here (production builds pass an official
# base instead: deploy/docker/README.md).
#   deploy/docker/base.sh            import the cached rootfs, or build it first (idempotent)
#   deploy/docker/base.sh --rebuild  debootstrap again (to take Debian's security updates)
#
# The rootfs is minbase (dpkg, apt, bash, coreutils) plus CPython 3.11 with venv, CA certificates and
# tzdata, with bookworm-updates and bookworm-security applied. Documentation and locales are removed,
# and a dpkg rule keeps later `apt-get install`s (the inference image's wget) from adding them back.
# The tarball and its package list (name, version) are cached in
# ${FIRSTMILE_TOOLS:-~/.cache/firstmile-tools}/debian-base-bookworm; the list is also in the image,
# /usr/share/firstmile-base/packages.txt.
#
# Needs root (debootstrap, chroot) and an engine: eval "$(deploy/docker/engine.sh env)".
set -euo pipefail

image=${FIRSTMILE_BASE_IMAGE:-firstmile/debian-base:bookworm}
mirror=${FIRSTMILE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${FIRSTMILE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
tools=${FIRSTMILE_TOOLS:-$HOME/.cache/firstmile-tools}
cache="$tools/debian-base-bookworm"
root="$cache/rootfs.new"
docker=${DOCKER:-docker}
packages=python3,python3-venv,ca-certificates,tzdata

rebuild=
[ "${1:-}" = --rebuild ] && rebuild=1

if [ -z "$rebuild" ] && "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "base.sh: $image is present"
  exit 0
fi

build_rootfs() {
  if [ "$(id -u)" != 0 ]; then
    echo "base.sh: debootstrap needs root (chroot, device nodes, file ownership)" >&2
    exit 1
  fi
  if ! command -v debootstrap >/dev/null; then
    echo "base.sh: installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2 \
      || { apt-get update -q >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >&2; }
  fi
  mkdir -p "$cache"
  rm -rf "$root"
  mkdir -p "$root"
  # /proc in the chroot (some maintainer scripts read it) must not outlive the script.
  trap 'umount "$root/proc" 2>/dev/null || true' EXIT
  echo "base.sh: debootstrap bookworm (minbase + $packages) from $mirror"
  debootstrap --variant=minbase --include="$packages" --components=main bookworm "$root" "$mirror" \
    > "$cache/debootstrap.log" 2>&1 || { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }

  # The layout of Debian's official images (debuerreotype): deb822 sources with the point-release
  # updates and the security archive, no recommends, no apt caches or docs in images.
  rm -f "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat > "$root/etc/apt/apt.conf.d/90firstmile" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  cat > "$root/etc/dpkg/dpkg.cfg.d/90firstmile-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  echo "base.sh: applying bookworm-updates and bookworm-security"
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get upgrade -y -q && apt-get clean' >> "$cache/debootstrap.log" 2>&1 \
    || { tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
  umount "$root/proc"

  mkdir -p "$root/usr/share/firstmile-base"
  # shellcheck disable=SC2016  # dpkg-query's format, not shell expansions
  chroot "$root" dpkg-query -W -f '${Package}=${Version}\n' | sort > "$root/usr/share/firstmile-base/packages.txt"
  # Files the running image never needs; the rootfs of a container must not carry the host's resolver.
  find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$root/usr/share/man"/* "$root/usr/share/info"/* "$root/usr/share/locale"/* "$root/usr/share/lintian"/* \
    "$root/var/lib/apt/lists"/* "$root/var/cache/apt"/* "$root/var/cache/debconf"/*-old \
    "$root/var/log"/* "$root/tmp"/* "$root/root"/.[!.]* "$root/etc/machine-id"
  : > "$root/etc/resolv.conf"
  : > "$root/etc/hostname"
  find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +

  tar --numeric-owner --xattrs -C "$root" -cf "$cache/rootfs.tar.new" .
  cp "$root/usr/share/firstmile-base/packages.txt" "$cache/packages.txt"
  mv "$cache/rootfs.tar.new" "$cache/rootfs.tar"
  rm -rf "$root"
}

if [ -n "$rebuild" ] || [ ! -s "$cache/rootfs.tar" ]; then
  build_rootfs
fi

python=$(grep '^python3.11=' "$cache/packages.txt" | cut -d= -f2)
created=$(date -u -r "$cache/rootfs.tar" +%Y-%m-%dT%H:%M:%SZ)
echo "base.sh: importing $cache/rootfs.tar as $image (python3.11 $python)"
"$docker" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL org.opencontainers.image.title=firstmile-debian-base \
org.opencontainers.image.description=\"Debian 12 (bookworm) minbase + CPython 3.11 (debootstrap), the local base of Firstmile's images\" \
org.opencontainers.image.created=$created \
org.opencontainers.image.base.name=debian:bookworm \
org.opencontainers.image.version=bookworm-python$python" \
  "$cache/rootfs.tar" "$image" >/dev/null
"$docker" image ls "$image"
