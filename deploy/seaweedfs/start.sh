#!/bin/sh
# SeaweedFS for compose.yaml's `seaweedfs` service: master, volume, filer and the S3 gateway
# in one process. Its one S3 identity is written from the environment at start, so no key is
# stored in this repository or in the image (keys: use hex or URL-safe random values).
set -eu
: "${WHISPERQ_S3_ACCESS_KEY_ID:?set WHISPERQ_S3_ACCESS_KEY_ID}"
: "${WHISPERQ_S3_SECRET_ACCESS_KEY:?set WHISPERQ_S3_SECRET_ACCESS_KEY}"
dir=${SEAWEEDFS_DIR:-/data}
config=${SEAWEEDFS_S3_CONFIG:-/tmp/whisperq-s3.json}
umask 077
cat >"$config" <<JSON
{"identities": [{"name": "whisperq",
  "credentials": [{"accessKey": "$WHISPERQ_S3_ACCESS_KEY_ID", "secretKey": "$WHISPERQ_S3_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
exec "${WEED:-weed}" server -dir="$dir" -s3 -s3.port="${SEAWEEDFS_S3_PORT:-8333}" \
  -s3.config="$config" "$@"
