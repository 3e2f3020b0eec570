# The B3Job operator: kopf + the official kubernetes client + b3.spec (no torch).
#   docker build -f images/operator.Dockerfile -t ghcr.io/b3-operator/operator:$APP_VERSION .
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY images/operator-requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY b3 ./b3
COPY jobs ./jobs
COPY operator ./operator
# the project itself without its training dependencies: the operator only needs b3.spec
RUN pip install --no-deps . && rm -rf /src

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin b3
USER 10001
WORKDIR /
EXPOSE 8000 8080
ENTRYPOINT ["kopf", "run", "-m", "b3_operator.handlers"]
CMD ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--log-format=json"]
