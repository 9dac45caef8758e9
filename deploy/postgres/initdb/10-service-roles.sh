#!/bin/sh
# Run once by the postgres image when its data volume is first initialised (as the image's
# superuser): the login roles of the predictor, the trainer and the simulator, with their
# passwords read from the compose secrets by psql itself (`\set` with backquotes), so that no
# password appears on a command line. For an existing volume, run it by hand:
#   docker compose exec postgres sh /docker-entrypoint-initdb.d/10-service-roles.sh
set -eu
{
    echo '\set predictor_password `cat /run/secrets/predictor_password`'
    echo '\set trainer_password `cat /run/secrets/trainer_password`'
    echo '\set simulator_password `cat /run/secrets/simulator_password`'
    cat /etc/sensor-predictor/service_roles.sql
} | psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}"
