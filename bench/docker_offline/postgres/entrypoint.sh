#!/bin/sh
# Minimal stand-in for the official postgres image's entrypoint: POSTGRES_USER/PASSWORD/DB.
set -e
export PATH=/usr/lib/postgresql/15/bin:$PATH
PGDATA=/var/lib/postgresql/data
mkdir -p "$PGDATA" /run/postgresql && chown -R postgres "$PGDATA" /run/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
  su postgres -c "initdb -D $PGDATA -U $POSTGRES_USER --pwfile=/tmp/pw -A md5" >/dev/null
  echo "listen_addresses='*'" >> "$PGDATA/postgresql.conf"
  echo "host all all 0.0.0.0/0 md5" >> "$PGDATA/pg_hba.conf"
  su postgres -c "pg_ctl -D $PGDATA -w start -o '-c listen_addresses=127.0.0.1'" >/dev/null
  PGPASSWORD=$POSTGRES_PASSWORD psql -h 127.0.0.1 -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$POSTGRES_DB\""
  su postgres -c "pg_ctl -D $PGDATA -w stop" >/dev/null
fi
exec su postgres -c "postgres -D $PGDATA"
