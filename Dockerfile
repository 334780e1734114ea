# syntax=docker/dockerfile:1
# One image for every role of the project (the CPU engine, SGLang's router, rollout, verifier,
# trainer and the offline jobs): the roles share one Python package and its dependencies, so
# one image is one build, one cache and one tag to roll out; the command picks the role:
#
#   docker run pope-rl rollout --host 0.0.0.0 --model /models/base --config /etc/pope/pope.yaml
#
# BASE_IMAGE: any Debian-based Python 3.11 image (a local one for air-gapped builds).
# TORCH_INDEX: where torch comes from. Default: PyTorch's CPU wheels (~200 MB instead of the
# multi-GB CUDA build that PyPI serves for Linux); a CUDA index for the GPU trainer image
# (https://download.pytorch.org/whl/cu128); empty to use only wheels put in docker/wheels/.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# pip trusts the system's CA store (a TLS-inspecting proxy's CA added to the base image works).
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_CERT=${PIP_CERT}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch==2.13.0
COPY pyproject.toml README.md /src/
COPY services /src/services
# EXTRAS: the package's extras in the image. router: SGLang's router (`pope router`, several
# engines); add wandb (EXTRAS=router,wandb) for a trainer that logs to Weights & Biases.
ARG EXTRAS=router
RUN pip install --find-links /tmp/wheels "/src[${EXTRAS}]" && pip uninstall -y pip setuptools

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 pope && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin pope \
    && mkdir -p /data /weights /models && chown 10001:10001 /data /weights
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
USER 10001:10001
WORKDIR /data
# The role's health URL: compose and Kubernetes set their own checks per role; this one
# serves `docker run` (override HEALTHCHECK_URL for roles other than rollout).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["pope"]
CMD ["--help"]
