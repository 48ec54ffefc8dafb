-- run once by the postgres image on an empty volume: one database per server
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
