# One image for api, worker, flower and migrate; compose picks the command.
# Versions come from scripts/constraints.txt (a freeze of the tested environment), so a
# rebuild months later installs what CI tested.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/whisperq
# TORCH_INDEX: PyPI's default wheel is the CUDA build (GPU profile); the CPU profile builds
# with TORCH_INDEX=https://download.pytorch.org/whl/cpu for a far smaller image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
COPY scripts/constraints.txt ./constraints.txt
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Non-editable: migrations travel inside the package, so nothing here needs the source tree.
RUN pip install --no-cache-dir -c constraints.txt ".[worker]" \
 && rm -rf app worker migrations

RUN useradd --system --uid 10001 whisperq && mkdir -p /data /models && chown whisperq /data /models
USER whisperq
WORKDIR /data
ENV WHISPERQ_DATA_DIR=/data
EXPOSE 8000 5555 9400
CMD ["whisperq", "api", "--host", "0.0.0.0", "--port", "8000"]
