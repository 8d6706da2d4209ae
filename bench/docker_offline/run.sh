#!/usr/bin/env bash
# The image and the compose stack where Docker Hub is out of reach (only package archives):
# README, "Docker". Root, a running dockerd (docker.io), debootstrap, curl, espeak-ng.
# Not part of the test suite (CI has no Docker daemon). Usage:
#   bash bench/docker_offline/run.sh [WHEELS_DIR]     # e.g. a folder with a CPU torch wheel
set -euo pipefail
cd "$(dirname "$0")/../.."
here=bench/docker_offline
work=${WHISPERQ_OFFLINE_WORK:-/tmp/whisperq-docker-offline}
base=whisperq-base:bookworm
project=whisperq-offline
mkdir -p "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "== base image from Debian's archive"
  [ -x "$work/rootfs/usr/bin/python3" ] || debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates bookworm "$work/rootfs" http://deb.debian.org/debian
  # A TLS-intercepting proxy's CA (if the host has one) must be trusted inside too.
  cp /usr/local/share/ca-certificates/*.crt "$work/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$work/rootfs" update-ca-certificates >/dev/null
  tar -C "$work/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$base"
fi

build_args=(--network host --build-arg "BASE_IMAGE=$base")
server=""
if [ -n "${1:-}" ]; then
  port=$(free_port)
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$1" >/dev/null 2>&1 &
  server=$!
  build_args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
fi
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null || true
  WHISPERQ_KEY_PEPPER=x docker-compose -p "$project" --profile cpu down -v >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== whisperq image"
DOCKER_BUILDKIT=0 docker build -q "${build_args[@]}" -t whisperq:latest . >/dev/null
docker run --rm whisperq:latest whisperq --version
docker run --rm -e WHISPERQ_KEY_PEPPER=offline-check-pepper-0123456789 \
  -v "$project-migrate:/data" whisperq:latest whisperq migrate && echo "migrate (SQLite): exit 0"
docker volume rm "$project-migrate" >/dev/null

for image in postgres:16 redis:7; do
  if ! docker image inspect "$image" >/dev/null 2>&1 && ! docker pull -q "$image" >/dev/null 2>&1; then
    echo "== $image unreachable: a stand-in from $here/${image%%:*}"
    DOCKER_BUILDKIT=0 docker build -q --network host --build-arg "BASE_IMAGE=$base" \
      -t "$image" "$here/${image%%:*}" >/dev/null
  fi
done

echo "== docker-compose --profile cpu up"
mkdir -p "$work/models"
export WHISPERQ_KEY_PEPPER="offline-$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
export WHISPERQ_FLOWER_PASSWORD=offline-flower WHISPERQ_MODELS_DIR="$work/models"
export WHISPERQ_API_PORT=$(free_port) WHISPERQ_FLOWER_PORT=$(free_port)
docker-compose -p "$project" --profile cpu up -d >/dev/null 2>&1
api=http://127.0.0.1:$WHISPERQ_API_PORT
for _ in $(seq 300); do
  state=$(docker inspect -f '{{.State.Health.Status}}' "${project}_worker-cpu_1" 2>/dev/null || true)
  [ "$state" = healthy ] && curl -sf "$api/readyz" >/dev/null && break
  sleep 1
done
docker-compose -p "$project" --profile cpu ps
docker logs "${project}_worker-cpu_1" 2>&1 | grep -o '"msg": "serving[^"]*' | head -1 || true
key=$(docker-compose -p "$project" --profile cpu exec -T api whisperq keys create --name me \
  | awk '/api key/{print $3}')
espeak-ng -w "$work/meeting.wav" "The quarterly report is ready. Please review the budget before Friday."
curl -s "$api/v1/inference/openai/whisper-tiny" -H "Authorization: bearer $key" \
  -F audio=@"$work/meeting.wav" -F task=transcribe -F temperature=0 -F no_speech_threshold=0.6
echo
flower=http://127.0.0.1:$WHISPERQ_FLOWER_PORT
echo "flower without its login: $(curl -s -o /dev/null -w '%{http_code}' "$flower/workers")"
echo "flower workers: $(curl -s -u "admin:$WHISPERQ_FLOWER_PASSWORD" "$flower/workers" \
  | grep -o 'whisperq-[0-9]*@[a-z0-9]*' | sort -u | tr '\n' ' ')"
curl -s "$api/metrics" | grep '^whisperq_jobs{'
