-- Run once by the postgres image on an empty data directory (compose.yaml mounts it into
-- /docker-entrypoint-initdb.d). The image itself creates the user kappa and the database
-- kappa_edw (POSTGRES_USER, POSTGRES_DB); this adds Dagster's storage database and the
-- OLTP database whose tables are captured.
-- Schemas and tables are made by `kappa up` / `kappa init`, idempotently.
CREATE DATABASE kappa_dagster OWNER kappa;
CREATE DATABASE kappa_oltp OWNER kappa;
