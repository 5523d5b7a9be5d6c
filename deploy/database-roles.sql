-- The database roles of ApiOps, least privilege:
--   migration_role  owns the service's tables: `apiops db upgrade` (the migration Job) runs as it. It is no
--                   superuser, has no CREATEDB and no CREATEROLE.
--   runtime_role    what the API and the workers connect as: it reads, adds and changes rows of the service's
--                   tables (SELECT, INSERT, UPDATE; USAGE of their sequences) and nothing else: no DELETE, no
--                   TRUNCATE, no CREATE, ALTER or DROP.
--
-- Run it as a superuser, connected to the service's own database, which must exist (CREATE DATABASE apiops):
--
--   psql "postgresql://postgres@db.example.internal/apiops" -v ON_ERROR_STOP=1 \
--     -v migration_role=apiops_migrator -v migration_password="$MIGRATOR_PASSWORD" \
--     -v runtime_role=apiops -v runtime_password="$RUNTIME_PASSWORD" -f deploy/database-roles.sql
--
-- The names default to apiops_migrator and apiops; a role that exists is kept (its password changed only when one
-- is given), so running it again is safe. Give the service a database of its own: the grants cover every table of
-- the schema `public` (the migrations' `alembic_version` included, which the runtime role never needs).

\set ON_ERROR_STOP on
\if :{?migration_role}
\else
  \set migration_role apiops_migrator
\endif
\if :{?runtime_role}
\else
  \set runtime_role apiops
\endif

SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'migration_role') AS missing \gset
\if :missing
  CREATE ROLE :"migration_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
\endif
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'runtime_role') AS missing \gset
\if :missing
  CREATE ROLE :"runtime_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
\endif
\if :{?migration_password}
  ALTER ROLE :"migration_role" PASSWORD :'migration_password';
\endif
\if :{?runtime_password}
  ALTER ROLE :"runtime_role" PASSWORD :'runtime_password';
\endif

-- Both connect; only the migration role creates in the schema (PostgreSQL before 15 lets everybody).
SELECT current_database() AS database \gset
GRANT CONNECT ON DATABASE :"database" TO :"migration_role", :"runtime_role";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO :"migration_role";
GRANT USAGE ON SCHEMA public TO :"runtime_role";

-- What the migrations will create: default privileges of the migration role's future tables and sequences, so a
-- table added by a later migration is usable by the runtime role with no grant of its own.
ALTER DEFAULT PRIVILEGES FOR ROLE :"migration_role" IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE ON TABLES TO :"runtime_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migration_role" IN SCHEMA public
  GRANT USAGE ON SEQUENCES TO :"runtime_role";

-- What they created already (this script run after a migration).
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO :"runtime_role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO :"runtime_role";
