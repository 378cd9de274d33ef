# The image every manifest in cluster/ runs: the official Ray image (same Ray version as the cluster) with vembed.
#   docker build -t vembed:0.1.0 .          (tag: the version in pyproject.toml; push it to your registry)
# The GPU flavour of the Ray image also runs CPU-only pods (the KubeRay head, CPU workers).
FROM rayproject/ray:2.60.0-py311-gpu

# Entrypoints and configs live here; cluster manifests call them by absolute path.
WORKDIR /home/ray/vembed

# Dependencies first (cached while only the code changes), then the package itself.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users vembed ./vembed
RUN pip install --no-cache-dir . && python -c "import vembed, torch, transformers, peft"

COPY --chown=ray:users configs ./configs
COPY --chown=ray:users ray_jobs ./ray_jobs

ENV TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface
