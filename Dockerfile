# The agent's image: worker (default), beat and Flower run from it. The production image has no
# simulators; the compose `local` profile builds its `stack` image with PONOS_EXTRAS=sim.
FROM python:3.11-slim

# Extras of the package to install, e.g. "sim" (the simulators and the local stack).
ARG PONOS_EXTRAS=""

# REMAP_SIGTERM: SIGTERM (docker stop, platform restarts) triggers Celery's cold/soft
# shutdown, so unacked work is requeued at once instead of waiting for the visibility timeout.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REMAP_SIGTERM=SIGQUIT

# /run/ponos-local: where the local profile's stack writes the agent config (a named volume
# shared with the agent's containers; a new volume takes this directory's owner).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ponos \
    && mkdir -p /run/ponos-local \
    && chown ponos:ponos /run/ponos-local

# constraints.txt pins every runtime dependency (`make lock` regenerates it), so that two
# builds of one commit install the same versions.
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py constraints.txt ./
COPY ponos_tasks ./ponos_tasks
RUN pip install -c constraints.txt ".${PONOS_EXTRAS:+[$PONOS_EXTRAS]}" && rm -rf build ./*.egg-info

USER ponos

# Same command as the Procfile's `worker` (tests/test_deploy.py checks it).
CMD ["celery", "-A", "ponos_tasks.app", "worker", "--queues", "sync,steps", "--concurrency", "4", "--prefetch-multiplier", "1", "--loglevel", "INFO"]
