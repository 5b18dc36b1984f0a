-- chargeline database roles: who may change the schema, and who may only run it.
--
--   chargeline_migrator  owns the schema's objects; `chargeline migrate` connects as it.
--   chargeline_runtime   what workers and the CLI connect as: reads and writes rows, runs no
--                        DDL, and cannot delete from the append-only tables (ledger_entries,
--                        alerts, charges) nor rewrite the ledger.
--
-- Run it as an administrator (a superuser, or the database owner with CREATEROLE) connected
-- to the chargeline database, BEFORE and again AFTER every `chargeline migrate`. It is
-- idempotent. The first run creates the roles and the default privileges that tables created
-- later by the migrator get; the run after a migration adds the per-table exceptions below
-- (and takes over tables that another role created before these roles existed).
--
--   psql "$ADMIN_DATABASE_URL" -v ON_ERROR_STOP=1 -f schemas/sql/roles.sql
--
-- Passwords are not set here (this file is kept in git): see deploy/postgres/apply-roles.sh,
-- or `ALTER ROLE chargeline_runtime PASSWORD '...'` by hand. Everything lives in the `public`
-- schema, like the migrations.

-- 1. The roles (LOGIN, nothing else: no superuser, no CREATEROLE, no CREATEDB).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'chargeline_migrator') THEN
        CREATE ROLE chargeline_migrator LOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- created by a concurrent run
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'chargeline_runtime') THEN
        CREATE ROLE chargeline_runtime LOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

-- 2. The schema: only the migrator creates objects in it (PostgreSQL before 15 let every role
--    create in `public`). Both roles may connect to this database.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO chargeline_migrator;
GRANT USAGE ON SCHEMA public TO chargeline_runtime;

DO $$
BEGIN
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO chargeline_migrator, chargeline_runtime',
        current_database()
    );
END
$$;

-- 3. Tables that exist already but belong to someone else (migrated before these roles
--    existed): the migrator takes them over, identity sequences included.
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.relname
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
          AND c.relkind IN ('r', 'p')
          AND pg_catalog.pg_get_userbyid(c.relowner) <> 'chargeline_migrator'
    LOOP
        EXECUTE format('ALTER TABLE public.%I OWNER TO chargeline_migrator', item.relname);
    END LOOP;
END
$$;

-- 4. What the runtime may do, on the tables there are and on every table a later migration
--    creates: read, insert, update. Not DELETE, TRUNCATE, REFERENCES or TRIGGER; and, not
--    being an owner, no ALTER or DROP.
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO chargeline_runtime;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO chargeline_runtime;
ALTER DEFAULT PRIVILEGES FOR ROLE chargeline_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE ON TABLES TO chargeline_runtime;
ALTER DEFAULT PRIVILEGES FOR ROLE chargeline_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO chargeline_runtime;

-- 5. Per-table exceptions, for the tables that exist (a run before the migrations skips them;
--    the run after adds them):
--    - DELETE only where a worker's own SQL deletes: credit_voids (a void of an unknown grant
--      is a dead letter; its dedup row goes in the same transaction) and outbox (the relay
--      removes published rows past their retention). A new DELETE in workers/sql needs its
--      table listed here; tests/integration/test_roles.py checks that.
--    - the ledger is append-only: no UPDATE either;
--    - schema_migrations is the migrator's: the runtime only reads it.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['credit_voids', 'outbox'] LOOP
        IF to_regclass(format('public.%I', name)) IS NOT NULL THEN
            EXECUTE format('GRANT DELETE ON public.%I TO chargeline_runtime', name);
        END IF;
    END LOOP;
    FOREACH name IN ARRAY ARRAY['ledger_entries'] LOOP
        IF to_regclass(format('public.%I', name)) IS NOT NULL THEN
            EXECUTE format('REVOKE UPDATE ON public.%I FROM chargeline_runtime', name);
        END IF;
    END LOOP;
    IF to_regclass('public.schema_migrations') IS NOT NULL THEN
        REVOKE INSERT, UPDATE ON public.schema_migrations FROM chargeline_runtime;
    END IF;
END
$$;
