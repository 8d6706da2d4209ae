# One image for api, worker, flower and migrate; compose picks the command.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/whisperq
# The default PyPI torch wheel is the CUDA build the GPU worker needs.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir ".[worker]"

RUN useradd --system --uid 10001 whisperq && mkdir -p /data /models && chown whisperq /data /models
USER whisperq
ENV WHISPERQ_BLOB_DIR=/data/blobs WHISPERQ_MODEL_DOWNLOAD_ROOT=/models
EXPOSE 8000 5555
CMD ["whisperq", "api", "--host", "0.0.0.0", "--port", "8000"]
