# syntax=docker/dockerfile:1
# One image for both daemons (nvidia-device-plugin, gpu-feature-discovery) and the tools
# (mock-kubelet, fake-nvml). Build: `docker build -t nvidia-k8s-py:0.1.0 .` (make image); the
# `RUN --mount` below needs BuildKit, the default builder since Docker 23 (and in buildah/podman).

# Builder: build our wheel and collect the wheels of every dependency, so the final stage installs
# offline and needs no compiler (grpcio, protobuf and PyYAML ship manylinux wheels for 3.11).
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpus ./gpus
COPY deviceplugin ./deviceplugin
COPY gfd ./gfd
COPY protos ./protos
COPY exporter ./exporter
COPY mpsdaemon ./mpsdaemon
COPY demo ./demo
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="nvidia-k8s-py" \
      org.opencontainers.image.description="NVIDIA GPU device plugin and GPU feature discovery, in Python" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
# The wheels are bind-mounted from the builder, never copied: no wheel, source tree or pip cache
# ends up in a layer.
# Bytecode: the root filesystem is read-only and PYTHONDONTWRITEBYTECODE is set, so every .pyc
# Python deems stale is recompiled in memory at every start (slower; on a containerd node GFD
# then used ~130 MiB against its 96Mi request).
# pip's .pyc files record each .py's mtime and go stale when an image builder rounds or rewrites
# timestamps, so pip compiles nothing (--no-compile: compileall would keep pip's .pyc files, their
# mtimes still matching here) and compileall writes checked-hash .pyc files, valid while the .py
# content is unchanged, whatever its mtime. Checked rather than unchecked: the check costs a read
# and a hash per module, and a .py changed later (a derived image, a debugging mount) is honoured
# instead of silently running stale bytecode. The base image's own files come in its layers,
# which a builder reuses as they are.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-compile --no-index --find-links=/wheels nvidia-k8s-py \
    && python -m compileall -q -j 0 --invalidation-mode checked-hash \
       "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && groupadd --system --gid 65532 nvk8s \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin nvk8s
# NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES make the NVIDIA container runtime inject
# libnvidia-ml and the device nodes ("utility" = NVML and nvidia-smi, no CUDA libraries).
# Bytecode is compiled at install time (above) and the root filesystem is read-only at run time.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Unprivileged by default. The DaemonSet runs the device plugin as root with every capability
# dropped, because the kubelet's device-plugins directory is root-owned (docs/deploy.md).
USER 65532:65532
CMD ["nvidia-device-plugin"]
