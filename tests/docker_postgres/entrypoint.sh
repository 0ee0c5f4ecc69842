#!/bin/sh
# First start: a cluster whose superuser is POSTGRES_USER (password auth over TCP) with the database
# POSTGRES_DB, as the official image makes it. Then the server, in the foreground.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${POSTGRES_DB:?}"

if [ ! -s "${PGDATA}/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD}" >"${pwfile}"
    initdb --username="${POSTGRES_USER}" --pwfile="${pwfile}" --auth-local=trust --auth-host=scram-sha-256 \
        -D "${PGDATA}" >/dev/null
    rm -f "${pwfile}"
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"${PGDATA}/pg_hba.conf"
    pg_ctl -D "${PGDATA}" -o "-c listen_addresses=''" -w start >/dev/null
    createdb --username="${POSTGRES_USER}" "${POSTGRES_DB}"
    pg_ctl -D "${PGDATA}" -m fast -w stop >/dev/null
fi

exec postgres -D "${PGDATA}" -c listen_addresses='*'
