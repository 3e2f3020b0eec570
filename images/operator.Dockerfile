# The B3Job operator: kopf + the official kubernetes client + b3.spec (no torch).
#   docker build -f images/operator.Dockerfile -t ghcr.io/b3-operator/operator:$APP_VERSION .
# BASE: any image with Python 3.11 on PATH as `python` and `pip` (the CI builds on a Debian
# base made offline with debootstrap; tests/cluster/build_images.sh)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# every package at the version CI tests (constraints.txt pins the whole closure)
COPY constraints.txt images/operator-requirements.txt /tmp/
RUN pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/operator-requirements.txt
COPY pyproject.toml README.md ./
COPY b3 ./b3
COPY jobs ./jobs
COPY operator ./operator
# the project itself without its training dependencies: the operator only needs b3.spec
RUN pip install --no-deps --no-cache-dir . && rm -rf /src /tmp/*.txt

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin b3
USER 10001
WORKDIR /
EXPOSE 8000 8080
ENTRYPOINT ["kopf", "run", "-m", "b3_operator.handlers"]
CMD ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--log-format=json"]
