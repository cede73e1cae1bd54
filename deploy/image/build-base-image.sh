#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian packages, with no registry and no Docker:
#   debootstrap bookworm (minbase + python3 3.11) -> FROM scratch + ADD -> uv installed, ENV set.
#   deploy/image/build-base-image.sh [IMAGE]        (default localhost/mlserve-base:bookworm)
# Cached: an existing IMAGE is kept (FORCE=1 rebuilds). Needs root, buildah and debootstrap.
# buildah's storage comes from CONTAINERS_STORAGE_CONF (mlserve containerize points it at a vfs
# store in ~/.cache/mlserve/containers).
set -euo pipefail
IMAGE="${1:-localhost/mlserve-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export BUILDAH_ISOLATION=chroot

if [ "${FORCE:-0}" != "1" ] && buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "==> base image $IMAGE already built (FORCE=1 rebuilds it)"
  exit 0
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/mlserve-base.XXXXXX")"
ctr=""
cleanup() {
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
rootfs="$work/rootfs"

start=$SECONDS
echo "==> debootstrap bookworm (minbase, python3 3.11) from $MIRROR"
# libgomp1: LightGBM and XGBoost load it (python:3.11-slim gets it with build-essential).
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,libgomp1 \
  bookworm "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# TLS to the package registries needs the host's CA bundle (the tree's own one fails here).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/usr/local/share/ca-certificates/host.crt"
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi
# Smaller: no apt lists, caches, docs or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
echo "    rootfs: $(du -sxh "$rootfs" 2>/dev/null | cut -f1) after $((SECONDS - start)) s"

echo "==> FROM scratch + ADD rootfs.tar (ownership and modes kept)"
tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .
rm -rf "$rootfs"
ctr="$(buildah from scratch)"
buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
buildah config --cmd /bin/bash "$ctr"
raw="${IMAGE}-rootfs"
buildah commit --rm "$ctr" "$raw" >/dev/null
ctr=""

echo "==> installing uv into the base (BentoML's Dockerfile installs packages with it)"
ctr="$(buildah from "$raw")"
buildah run --isolation chroot --network host "$ctr" -- sh -ec '
  python3 -m venv /opt/uv
  /opt/uv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check uv
  ln -sf /opt/uv/bin/uv /opt/uv/bin/uvx /usr/local/bin/
  uv --version'
buildah config \
  --env LANG=C.UTF-8 \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --env UV_NO_CACHE=1 \
  --env PIP_NO_CACHE_DIR=1 \
  --env PIP_BREAK_SYSTEM_PACKAGES=1 \
  --label org.opencontainers.image.description="Debian bookworm minbase + python3 3.11 + uv (mlserve)" \
  "$ctr"
buildah commit --rm "$ctr" "$IMAGE" >/dev/null
ctr=""
buildah rmi "$raw" >/dev/null 2>&1 || true
echo "==> base image $IMAGE built in $((SECONDS - start)) s"
