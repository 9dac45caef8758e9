-- The stack's login roles, one per service, each a member of the NOLOGIN role that holds its
-- grants (migrations 0002 and 0011 grant them; this file only makes the roles exist, so it may
-- run before the first migration). Run as a role with CREATEROLE (the postgres image's
-- superuser runs it once, from /docker-entrypoint-initdb.d, when its volume is first created):
--
--   psql -v ON_ERROR_STOP=1 -v predictor_password="$(cat predictor_password.txt)" \
--        -v trainer_password=... -v simulator_password=... -f service_roles.sql
--
-- Re-running it is safe: a role that exists gets its password (and membership) set again.
SELECT format('CREATE ROLE %I NOLOGIN', r)
  FROM unnest(ARRAY['sensor_predictor_worker', 'sensor_predictor_trainer',
                    'sensor_predictor_simulator']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['sensor_predictor', 'sensor_trainer', 'sensor_simulator']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

-- Passwords arrive as psql variables (:'name' quotes each as a literal); the init script sets
-- them with `\set name `cat file`` so that none appears on a command line.
ALTER ROLE sensor_predictor WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'predictor_password';
ALTER ROLE sensor_trainer WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'trainer_password';
ALTER ROLE sensor_simulator WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'simulator_password';
GRANT sensor_predictor_worker TO sensor_predictor;
GRANT sensor_predictor_trainer TO sensor_trainer;
GRANT sensor_predictor_simulator TO sensor_simulator;
