# softswitch container image.
#
#   docker build -t softswitch .
#   docker run --rm --network host softswitch
#       -> embedded default config: SIP on udp+tcp 127.0.0.1:5060, HTTP on 127.0.0.1:8080.
#          127.0.0.1 inside a container is only reachable from the host with --network host.
#   docker run --rm -p 5060:5060/udp -p 5060:5060/tcp -p 8080:8080 \
#       -v "$PWD/conf:/etc/softswitch:ro" -v softswitch-data:/var/lib/softswitch \
#       softswitch softswitch run --config /etc/softswitch/softswitch.yaml
#       -> your own config; for published ports it must listen on 0.0.0.0 (udp:0.0.0.0:5060,
#          tcp:0.0.0.0:5060, http 0.0.0.0:8080), set data_dir: /var/lib/softswitch, and set
#          media.address to an address the phones can reach (and publish the RTP range).
# Stop: SIGTERM (docker stop) exits cleanly; reload: docker kill -s HUP <container>.

# ---- build: install the package and its runtime deps into a self-contained venv --------------
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/softswitch
# gcc for the mypyc-compiled hot modules (setup.py, D17); the build stage only, the runtime
# image has no compiler
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The whole context is copied here (add a .dockerignore for .venv/, var/, .git/ to keep it
# small); only the installed venv reaches the final image.
COPY . .
RUN /opt/softswitch/bin/pip install .

# ---- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ENV PATH=/opt/softswitch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/softswitch /opt/softswitch
RUN useradd --system --home-dir /var/lib/softswitch --shell /usr/sbin/nologin softswitch \
 && mkdir -p /var/lib/softswitch /etc/softswitch \
 && chown softswitch:softswitch /var/lib/softswitch
# bindings (SQLite) live in the config's data_dir: keep it on a volume
VOLUME ["/var/lib/softswitch"]
WORKDIR /var/lib/softswitch
USER softswitch
# SIP (udp+tcp) and HTTP; RTP ports come from the config's media.ports range
EXPOSE 5060/udp 5060/tcp 8080
STOPSIGNAL SIGTERM
# The default config listens on 127.0.0.1 only (safe by default): use --network host, or mount a
# config that listens on 0.0.0.0 and pass --config /etc/softswitch/softswitch.yaml (see above).
CMD ["softswitch", "run"]
