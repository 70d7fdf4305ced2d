# pagedllm on NVIDIA GPUs: `docker build -t pagedllm:0.1.0-cuda12.4 .`, then
#   docker run --gpus all --ipc=host -p 8000:8000 -v ~/.cache/huggingface:/models pagedllm:0.1.0-cuda12.4 MODEL
# Two stages: the build stage has pip and the build tools; the runtime stage only the virtual environment.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/pagedllm
ENV PATH=/opt/pagedllm/bin:$PATH
WORKDIR /src
# The dependencies first (PyPI's Linux torch is the CUDA build, with Triton), so a code change rebuilds one layer.
COPY pyproject.toml README.md ./
RUN mkdir pagedllm && touch pagedllm/__init__.py && pip install . && pip uninstall -y pagedllm
COPY pagedllm ./pagedllm
RUN pip install --no-deps .

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid, so a volume's permissions can be set for it (Kubernetes: runAsUser 1000, fsGroup 1000).
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin pagedllm \
    && mkdir -p /models && chown pagedllm:pagedllm /models
COPY --from=build /opt/pagedllm /opt/pagedllm
# Hub downloads go to /models: mount a volume there so a restart does not download the model again.
ENV PATH=/opt/pagedllm/bin:$PATH HF_HOME=/models PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/pagedllm
EXPOSE 8000
# /health: the engine loop is alive and makes progress. The start period covers loading a large model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Listening on every interface is what a container wants (the CLI's default is 127.0.0.1); a --host or --port
# given to `docker run` comes later on the command line and wins. Arguments after the image name: MODEL and flags.
ENTRYPOINT ["pagedllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
