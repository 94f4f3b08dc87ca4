# syntax=docker/dockerfile:1
# ViT-ReciproCAM service image.
#
#   docker build -t vit-reciprocam:cpu .                                   # CPU (default)
#   docker build -t vit-reciprocam:cuda --build-arg VARIANT=cuda .         # CUDA wheels of torch
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...  # other wheels
#   docker build --build-arg BAKE_MODELS="deit_small_patch16_224" ...     # weights inside the image
#
# See docs/deployment.md for running it (docker-compose.yml, docker/k8s/).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------
# build: a virtual environment with torch and the service, copied whole into the runtime stage.
FROM ${PYTHON_IMAGE} AS build

ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first: the largest layer, and the one that changes least often. The CPU wheels come from
# PyTorch's CPU index (no CUDA libraries), the CUDA wheels from its CUDA index.
RUN case "${VARIANT}" in \
        cpu) default_index=https://download.pytorch.org/whl/cpu ;; \
        cuda) default_index=https://download.pytorch.org/whl/cu128 ;; \
        *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL:-$default_index}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/constraints.txt

WORKDIR /src

# The other dependencies, read from pyproject.toml, in their own layer: editing app/ does not
# reinstall them. The constraints keep the torch installed above.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /opt/requirements.txt \
    && pip install --no-cache-dir --constraint /opt/constraints.txt --requirement /opt/requirements.txt

COPY app ./app
RUN pip install --no-cache-dir --no-deps --constraint /opt/constraints.txt . \
    && python -I -c "import app.cli, torch; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------------------------------
# runtime: the virtual environment, a non-root user and nothing else.
FROM ${PYTHON_IMAGE} AS runtime

ARG BAKE_MODELS=""

LABEL org.opencontainers.image.title="vit-reciprocam-service" \
      org.opencontainers.image.description="timm Vision Transformer predictions with ViT-ReciproCAM saliency maps over REST" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch

RUN groupadd --system --gid 10001 reciprocam \
    && useradd --system --uid 10001 --gid reciprocam --home-dir /srv --no-create-home \
        --shell /usr/sbin/nologin reciprocam \
    && mkdir -p /srv /cache/huggingface /cache/torch \
    && chown -R reciprocam:reciprocam /srv /cache

COPY --from=build /opt/venv /opt/venv
COPY docker/bake_weights.py /opt/reciprocam/bake_weights.py

WORKDIR /srv
# Numeric, so that Kubernetes can check runAsNonRoot without looking the name up.
USER 10001:10001

# Optional: download hub weights into the cache now, so that the container starts without network
# access. This must come before VOLUME: changes under a volume path after it are discarded.
RUN if [ -n "${BAKE_MODELS}" ]; then python /opt/reciprocam/bake_weights.py ${BAKE_MODELS}; fi

# Hub weights are cached here (HF_HOME); mount a volume to keep them across containers.
VOLUME ["/cache"]
EXPOSE 8000

# Liveness only (the process answers); readiness (/readyz: models loaded) is for load balancers.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# SIGTERM drains: readiness turns 503, in-flight requests finish, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8000"]
