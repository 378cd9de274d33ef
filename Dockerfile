# The image every manifest in cluster/ runs: the official Ray image (same Ray version as the cluster) with vembed.
#   docker build -t vembed:0.1.0 .          (tag: the version in pyproject.toml; push it to your registry)
# The GPU flavour of the Ray image also runs CPU-only pods (the KubeRay head, CPU workers). The CUDA tag is explicit
# (not the moving "-gpu" alias) and torch comes from the PyTorch index of the same CUDA, so pip never pulls a torch
# built for another CUDA. Another CUDA: change both, e.g. -cu124 and TORCH_INDEX=.../whl/cu124. Plain
# Dockerfile syntax only (no RUN --mount), so it builds with BuildKit and with the legacy builder alike.
FROM rayproject/ray:2.60.0-py311-cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# Entrypoints and configs live here; cluster manifests call them by absolute path.
WORKDIR /home/ray/vembed

# The package and its dependencies (torch, transformers, peft; Ray itself is already in the base image).
# Installed in place (-e): vembed reads its key defaults from configs/defaults.yaml next to the package.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users vembed ./vembed
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir -e . \
    && python -c "from vembed.config import load_base_config; load_base_config(); import torch, transformers, peft"

# Job entrypoints, called by absolute path from the manifests.
COPY --chown=ray:users ray_jobs ./ray_jobs

# Serve's overload 503 as vembed's JSON error (Serve's HTTP proxy callback, read when a proxy starts); Serve's
# throughput-optimised mode off, as measured for this app (benchmarks/serve_throughput.py; set 1 to try it).
ENV TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface \
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=vembed.serving.overload:proxy_middlewares \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=0
