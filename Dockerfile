# aquasim: one image for every service of docker-compose.yml (worker, beat, flower,
# coordinator); the service's command picks the `aquasim` subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Install the project (its dependencies are wheels: no compiler needed on x86_64).
COPY pyproject.toml ./
COPY pipeline ./pipeline
COPY workers ./workers
COPY schema ./schema
RUN pip install . && rm -rf build *.egg-info

# Scenarios are data, read relative to the working directory (AQUASIM_SCENARIO).
COPY scenarios ./scenarios

# Run unprivileged; the working directory is writable (celery beat's schedule file,
# the data directory of the embedded servers if no URLs are given).
RUN useradd --create-home --uid 10001 aquasim && chown aquasim /app
USER aquasim

ENTRYPOINT ["aquasim"]
CMD ["--help"]
