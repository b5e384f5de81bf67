# fastlab on an NVIDIA PyTorch image: CUDA torch, triton and nvcc come with the base, so the
# CUDA extension builds against them and nothing replaces the image's torch.
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /opt/fastlab
COPY . .
RUN python -m pip install --no-cache-dir nvidia-ml-py pytest pytest-benchmark mpmath matplotlib \
 && FASTLAB_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    python -m pip install --no-cache-dir --no-build-isolation --no-deps -e . \
 && python -c "import fastlab, fastlab.kernels, fastlab._C"

CMD ["python", "-m", "fastlab.train"]
