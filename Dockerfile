# syntax=docker/dockerfile:1
# deny-observer image: `docker build -t ghcr.io/deny-observer/deny-observer:0.1.0 .`
# (deploy/base pulls ghcr.io/deny-observer/deny-observer; set your own with
# `kustomize edit set image`).
#
# Without a registry, `cargo xtask image` builds the same runtime stage with podman: BASE_IMAGE
# is a Debian base made locally with mmdebstrap, and BINARY=prebuilt takes the release binary
# already built on the host instead of compiling it in the `build` stage.
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:latest
ARG BINARY=build

# --- build: stable for userspace, nightly + rust-src + bpf-linker for the eBPF program ---------
FROM rust:1.95-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# aya-build runs `rustup run nightly cargo build -Z build-std=core` for observer-ebpf. The
# toolchain verified with the pinned aya crates is rustc 1.97.0-nightly (2026-05-19).
RUN rustup toolchain install nightly --profile minimal --component rust-src

# bpf-linker must use the same LLVM as the nightly rustc: link it against the nightly's own
# libLLVM (a prefix directory with libLLVM.so and the soname pointing at it). Versions and file
# names are read from the toolchain, not hard-coded.
RUN set -eux; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    llvm_major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    soname="$(basename "$(find "$sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n1)")"; \
    mkdir -p /opt/rust-llvm/lib; \
    ln -s "$sysroot/lib/$soname" /opt/rust-llvm/lib/libLLVM.so; \
    ln -s "$sysroot/lib/$soname" "/opt/rust-llvm/lib/$soname"; \
    LLVM_PREFIX=/opt/rust-llvm cargo install bpf-linker --locked \
        --no-default-features --features "llvm-${llvm_major}"

WORKDIR /src
COPY . .
# observer's build.rs builds and embeds the eBPF object; the result is one static-ish binary.
RUN cargo build --release --locked -p observer --bin deny-observer \
    && cp target/release/deny-observer /deny-observer

# --- or: the binary built on the host (`cargo xtask image`; the context holds only it) ----------
FROM scratch AS prebuilt
COPY target/release/deny-observer /deny-observer

# The stage named by BINARY; builders skip the other one.
# hadolint ignore=DL3006
FROM ${BINARY} AS binary

# --- runtime: glibc + libgcc only, no shell ------------------------------------------------------
# distroless publishes no version tags: pin a digest (@sha256:...) in release builds.
# hadolint ignore=DL3006,DL3007
FROM ${BASE_IMAGE}
COPY --from=binary /deny-observer /usr/bin/deny-observer
# uid 0 on purpose: Kubernetes cannot grant ambient capabilities, so a non-root user would lose
# the CAP_BPF/CAP_PERFMON the DaemonSet adds when the binary is exec'd (and tracefs is root-only).
# The DaemonSet drops every other capability, sets no_new_privs and a read-only root filesystem.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 9965
ENTRYPOINT ["/usr/bin/deny-observer"]
CMD ["run", "--inventory=kube", "--metrics-addr=0.0.0.0:9965"]
