#!/bin/sh
# Apply schemas/sql/roles.sql as a Postgres administrator, then set the two roles' passwords
# when they are given. Idempotent: run it before and again after every `chargeline migrate`.
#
#   ADMIN_DATABASE_URL=postgresql://postgres:...@db:5432/chargeline \
#   MIGRATOR_PASSWORD=... RUNTIME_PASSWORD=... \
#   sh deploy/postgres/apply-roles.sh [path/to/roles.sql]
#
# Needs psql (the postgres image has it). Passwords travel as psql variables, quoted by psql,
# never spliced into SQL text by the shell.
set -eu

: "${ADMIN_DATABASE_URL:?set ADMIN_DATABASE_URL to an administrator's postgresql:// URL}"
sql="${1:-$(dirname "$0")/roles.sql}"

psql "$ADMIN_DATABASE_URL" --no-psqlrc --quiet -v ON_ERROR_STOP=1 --file "$sql"

set_password() {
    # $1: role, $2: password (empty: leave the role's password as it is)
    if [ -n "$2" ]; then
        printf '%s\n' "ALTER ROLE $1 PASSWORD :'password';" |
            psql "$ADMIN_DATABASE_URL" --no-psqlrc --quiet -v ON_ERROR_STOP=1 -v password="$2"
    fi
}
set_password chargeline_migrator "${MIGRATOR_PASSWORD:-}"
set_password chargeline_runtime "${RUNTIME_PASSWORD:-}"
echo "apply-roles: roles and grants applied"
