#!/bin/sh
# A Debian bookworm base image for docker/Dockerfile, made without Docker Hub: debootstrap (minbase, from
# Debian's mirror) with python3 and a venv at /opt/venv whose `python` and `pip` come first on PATH, as
# the official PyTorch image's do. Root only (debootstrap and chroot).
# The image trusts the certificate authorities this host trusts (HOST_CA_BUNDLE), and its pip uses them:
# where a TLS-inspecting proxy stands between this host and the package registries, a build with
# --network host then reaches them as the host's own pip does.
#
#   scripts/docker_base.sh TARBALL [TAG]
#
# Writes the root filesystem to TARBALL unless it is already there (a cache: delete it to rebuild), then,
# with a TAG, imports it into the engine at $DOCKER_HOST:
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=TAG ...
set -eu

tarball=${1:?usage: scripts/docker_base.sh TARBALL [TAG]}
tag=${2:-}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
host_ca_bundle=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

if [ ! -s "${tarball}" ]; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "${rootfs}"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv "${suite}" "${rootfs}" "${mirror}" >&2
    if [ -s "${host_ca_bundle}" ]; then
        # A local CA: update-ca-certificates keeps it in the system bundle whenever it rebuilds that.
        cp "${host_ca_bundle}" "${rootfs}/usr/local/share/ca-certificates/host-trust.crt"
        chroot "${rootfs}" update-ca-certificates >/dev/null 2>&1
    fi
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"${rootfs}/etc/pip.conf"
    chroot "${rootfs}" python3 -m venv /opt/venv
    # Package lists and .debs are only needed to install more; they would double the image.
    rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    mkdir -p "$(dirname "${tarball}")"
    tar -C "${rootfs}" --numeric-owner -cf "${tarball}.part" .
    mv "${tarball}.part" "${tarball}"
fi

if [ -n "${tag}" ]; then
    docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        "${tarball}" "${tag}" >/dev/null
fi
