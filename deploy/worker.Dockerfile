# The udaflow worker of deploy/docker-compose.yml: this repository installed the README's way, then a
# Prefect process worker on the `udaflow` pool with a tag concurrency limit of one training at a time.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /udaflow
COPY . .
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 && pip install --no-cache-dir -e .
CMD ["/bin/sh", "-c", "prefect work-pool create udaflow --type process --overwrite && prefect concurrency-limit create \"udaflow-training@$(hostname)\" 1 && prefect --no-prompt deploy --all && exec prefect worker start --pool udaflow --type process"]
