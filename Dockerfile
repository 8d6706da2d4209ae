# One image for api, worker, flower and migrate; compose picks the command.
# Versions come from requirements.lock (the lock make test and CI install from), so a
# rebuild months later installs what CI tested.
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module. Where Docker
# Hub is out of reach, build one from Debian's own archive (see README, "Docker"):
#   debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm rootfs
#   tar -C rootfs -c . | docker import - whisperq-base:bookworm
#   docker build --build-arg BASE_IMAGE=whisperq-base:bookworm .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

# A venv: Debian's own python3 refuses system-wide pip installs (PEP 668); harmless on
# the python image. Its bin/ comes first, so `whisperq` and `python` are the venv's.
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /srv/whisperq
# TORCH_INDEX: PyPI's default wheel is the CUDA build (GPU profile); the CPU profile builds
# with TORCH_INDEX=https://download.pytorch.org/whl/cpu for a far smaller image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
# PIP_FIND_LINKS: a folder or URL of wheels pip prefers (e.g. a local CPU torch wheel served
# over HTTP) when the torch index is out of reach.
ARG PIP_FIND_LINKS=
COPY requirements.lock ./requirements.lock
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Non-editable: migrations travel inside the package, so nothing here needs the source tree.
RUN pip install --no-cache-dir -c requirements.lock ".[server,worker]" \
 && rm -rf app worker migrations

# /cache/whisper: downloads and the tiny.en fallback (a named volume starts with this owner).
RUN useradd --system --uid 10001 whisperq \
 && mkdir -p /data /models /cache/whisper && chown whisperq /data /models /cache /cache/whisper
USER whisperq
WORKDIR /data
ENV WHISPERQ_DATA_DIR=/data
EXPOSE 8000 5555 9400
CMD ["whisperq", "api", "--host", "0.0.0.0", "--port", "8000"]
