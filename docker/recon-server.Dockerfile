# recon-server: MRD stream server (9002), Gadgetron <connect> listener (18000), health and
# metrics (9090). Build from the repository root:
#   docker build -f docker/recon-server.Dockerfile -t recon-server .
# See docs/deployment.md (what was and was not built here, GPU notes).
#
# The base image brings CUDA, cuDNN 9 and a CUDA build of PyTorch. onnxruntime-gpu must match its
# CUDA major version: onnxruntime-gpu 1.2x from PyPI is built for CUDA 12 up to the release that
# moved to CUDA 13 (the ORT_SPEC default below stays on CUDA 12); pick both together.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG ORT_SPEC="onnxruntime-gpu>=1.20,<1.24"
ARG UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RECON_SERVER_CONFIG=/etc/recon-server/recon-server.toml

# curl for the health check; nothing else from apt.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/recon-server
COPY pyproject.toml README.md ./
COPY recon_server ./recon_server
# Keep the base image's CUDA torch: pin it so the project's "torch>=..." cannot pull another build.
RUN python -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt "${ORT_SPEC}" . \
    && python -c "import onnxruntime, torch, recon_server; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'torch', torch.__version__)"

# The shipped model is mounted at /models (docker-compose: named volume "models"). To bake it
# in instead, add:  COPY --chown=10001:10001 models/flair-stroke-demo /models/flair-stroke-demo
COPY docker/recon-server.toml /etc/recon-server/recon-server.toml

RUN useradd --uid ${UID} --user-group --no-create-home --shell /usr/sbin/nologin recon \
    && mkdir -p /models /var/lib/recon-server/dicom /var/lib/recon-server/spool \
    && chown -R recon:recon /models /var/lib/recon-server
USER recon
VOLUME ["/var/lib/recon-server"]

EXPOSE 9002 18000 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1

ENTRYPOINT ["recon-server"]
CMD ["serve", "--config", "/etc/recon-server/recon-server.toml"]
