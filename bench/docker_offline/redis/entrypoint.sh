#!/bin/sh
# Like the official image: no protected mode (the compose network is the boundary).
if [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no --bind 0.0.0.0 "$@"; fi
exec "$@"
