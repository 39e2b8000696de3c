# syntax=docker/dockerfile:1
# The streamrec image: one image for every part (ingest, features, the Ray head and workers of the
# RayService and the training RayJob, the CronJobs). Build it with k8s/image/build.sh, which fetches
# the wheelhouse and smoke-tests the result; by hand, elsewhere:
#
#   pip download --no-deps --require-hashes --only-binary=:all: -d .image-wheels \
#       -r k8s/image/requirements-cpu.lock --extra-index-url https://download.pytorch.org/whl/cpu
#   docker build -t streamrec:0.1.0 --build-arg BASE=python:3.11-slim-bookworm .
#
# GPU variant (torch's CUDA build and its nvidia-* wheels from PyPI, faiss-gpu instead of faiss-cpu):
#   pip download ... -d .image-wheels -r k8s/image/requirements-gpu.lock
#   docker build --build-arg LOCK=k8s/image/requirements-gpu.lock -t streamrec:0.1.0-gpu .
#
# The base must have python3 (3.11, the lock's Python) with venv; the default is Docker Hub's slim
# image. Dependencies come only from the lock file, hash-checked, so two builds of one commit hold the
# same packages. The runtime stage adds bash and wget, which KubeRay's probes run.

ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG LOCK=k8s/image/requirements-cpu.lock
ARG WHEELS=.image-wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_CONFIG_FILE=/dev/null
RUN python3 -m venv /opt/streamrec
COPY ${LOCK} /tmp/requirements.lock
# Offline, from the wheelhouse only, every file checked against the lock's hashes: the image holds
# exactly the lock (a missing wheel fails the build instead of reaching for an index).
RUN --mount=type=bind,source=${WHEELS},target=/wheels \
    /opt/streamrec/bin/pip install --no-index --find-links /wheels --require-hashes --no-deps \
        -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY streaming /src/streaming
COPY training /src/training
COPY services /src/services
# pip check: every installed package's requirements are met, except streamrec's faiss-cpu in the
# GPU variant, where faiss-gpu provides the same `faiss` module
RUN /opt/streamrec/bin/pip install --no-deps --no-build-isolation /src \
    && if ! broken="$(/opt/streamrec/bin/pip check)"; then \
         if echo "$broken" | grep -v "^streamrec .* requires faiss-cpu, which is not installed" | grep .; then exit 1; fi; \
       fi

FROM ${BASE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="streamrec" \
      org.opencontainers.image.description="Streaming recommender: Kafka ingest, Ray Data features, LoRA training with Ray Train, Ray Serve API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/streamrec/streamrec" \
      org.opencontainers.image.licenses="Apache-2.0"
# libgomp1: LightGBM's OpenMP runtime (the ranker; torch brings its own copy, LightGBM does not).
# bash and wget: KubeRay's head/worker probes and the RayService's serve probe run them. KubeRay
# starts Ray with `bash -lc`, and a login shell resets PATH from /etc/profile: profile.d puts the
# venv back in front.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bash wget ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 streamrec \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/streamrec --shell /bin/bash streamrec \
    && mkdir -p /data && chown 10001:10001 /data \
    && echo 'export PATH=/opt/streamrec/bin:$PATH' > /etc/profile.d/streamrec.sh
COPY --from=build /opt/streamrec /opt/streamrec
# no network at run time: the base model is a wheel in the venv, never a hub download
ENV PATH=/opt/streamrec/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    STREAMREC_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/streamrec
ENTRYPOINT ["streamrec"]
CMD ["--help"]
