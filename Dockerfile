# The server image: the SDK and server extras only (no torch); the model directory is mounted.
#   docker build -t textgen .
#   docker run -p 50051:50051 -v $PWD/models/tiny:/model textgen
# For a GPU, build with --build-arg EXTRA=gpu on a CUDA 13 / cuDNN 9 base image and run with --gpus all.
FROM python:3.11-slim
ARG EXTRA=server
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk sdk
COPY server server
COPY export export
RUN pip install --no-cache-dir ".[${EXTRA}]"
EXPOSE 50051
HEALTHCHECK CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
    s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')); \
    sys.exit(s.Check(h.HealthCheckRequest(), timeout=3).status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["textgen-server", "--model-dir", "/model", "--host", "0.0.0.0", "--port", "50051"]
