-- Run once by the postgres image's entrypoint, on an empty data volume, as POSTGRES_USER (so that user owns both).
-- mlflow: the MLflow server's backend store (docker/compose.yaml, service mlflow).
-- optuna: the sweeps' Optuna studies (python -m service.tune --set storage.optuna=postgresql+psycopg://.../optuna).
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
