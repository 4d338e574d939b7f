# The wsssrec image: the package with Ray Tune, DeepSpeed and MLflow, run as a non-root user.
#   CPU (default):  docker build -t wsssrec:cpu .
#   CUDA:           docker build -t wsssrec:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# `docker run --rm wsssrec:cpu demo -c configs/toy_birds.yaml` runs `wsssrec demo ...`. The Ray cluster YAMLs in
# deploy/ start the same image with --entrypoint="" because Ray's launcher runs its own commands in it.
# an exact point-release tag, not the moving `bookworm-slim` (Debian 12: Python 3.11, as deploy/requirements.lock)
ARG BASE_IMAGE=debian:12.12-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip extras of wsssrec to install: `tune` brings Ray Tune/Train and Optuna
ARG EXTRAS=tune

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-venv: the environment; g++, ninja-build, python3-dev: DeepSpeed JIT-builds its shm_comm op on first
# use; rsync, openssh-client: Ray's cluster launcher copies files into the container and reaches workers
# over ssh; git: runs record their git revision. Versions are not pinned because the CPU (Debian) and CUDA
# (Ubuntu) bases carry different ones; the exact base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ ninja-build rsync openssh-client git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV" \
 && groupadd --gid 10001 wsssrec \
 && useradd --create-home --shell /bin/bash --uid 10001 --gid 10001 wsssrec \
 && install -d -o 10001 -g 10001 /home/wsssrec/app

# torch first, from the index that matches the base (CPU or CUDA wheels); then everything else from PyPI
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /home/wsssrec/app
COPY --chown=10001:10001 pyproject.toml README.md ./
COPY --chown=10001:10001 data_shards/ data_shards/
COPY --chown=10001:10001 trainer/ trainer/
COPY --chown=10001:10001 tune/ tune/
COPY --chown=10001:10001 deploy/ deploy/
# every other dependency at the version the tests ran with (deploy/requirements.lock: pip freeze of that venv)
RUN pip install "./[${EXTRAS}]" -c deploy/requirements.lock \
 && rm -rf build ./*.egg-info
COPY --chown=10001:10001 configs/ configs/

# the user `wsssrec` (numeric, so the host and Kubernetes can resolve it)
USER 10001:10001
ENTRYPOINT ["wsssrec"]
CMD ["--help"]
