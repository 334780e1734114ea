#!/usr/bin/env bash
# Container smoke test (`make smoke-containers`; not part of CI): build the image from a local
# Debian base made with debootstrap, bring up docker-compose.yml's CPU stack with podman,
# submit problems, and wait for a training step and the engine serving its weights.
#
# Needs root, podman + runc + netavark/aardvark-dns, debootstrap (Debian: apt-get install
# podman runc debootstrap iptables: netavark needs iptables), and .venv (make venv). Everything it makes lives in runs/smoke/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=runs/smoke
BASE=localhost/pope-base:bookworm
PROJECT=pope-smoke
export POPE_IMAGE=localhost/pope-rl:smoke
mkdir -p "$WORK"
say() { echo "[smoke] $*"; }

# Podman here runs containers with runc and modest ulimits (a sandboxed host).
cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$PWD/$WORK/containers.conf"

# 1. A Debian base image with Python 3.11, made here: no registry is needed.
if ! podman image exists "$BASE"; then
    if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
        say "debootstrap: a minimal Debian bookworm with python3 in $WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
            http://deb.debian.org/debian > "$WORK/debootstrap.log"
    fi
    # This host reaches the package registries through a TLS-inspecting proxy: the base
    # trusts what the host trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    say "importing $WORK/rootfs as $BASE"
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE" > /dev/null
fi

# 2. The image, from that base; torch from a local CPU wheel when there is one (offline).
TORCH_INDEX=https://download.pytorch.org/whl/cpu
for wheel in ${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-*.whl}; do
    if [ -f "$wheel" ]; then cp -u "$wheel" docker/wheels/; TORCH_INDEX=; say "torch from $wheel"; fi
done
say "building $POPE_IMAGE (base $BASE)"
podman build --quiet --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_INDEX="$TORCH_INDEX" -t "$POPE_IMAGE" . \
    > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
say "image size: $(podman image inspect "$POPE_IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
# No registry is reachable for redis:7.2 either: Debian's redis-server on the same base.
REDIS_IMAGE=localhost/pope-redis:smoke
if ! podman image exists "$REDIS_IMAGE"; then
    say "building $REDIS_IMAGE (Debian's redis-server)"
    printf 'FROM %s\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*\n' \
        "$BASE" | podman build --quiet -t "$REDIS_IMAGE" - >> "$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
fi

# 3. The CPU stack, as a user runs it: a tiny model, the env file, the cpu profile.
[ -f "$WORK/model/config.json" ] || .venv/bin/pope model init --out "$WORK/model" > /dev/null
chmod -R a+rX "$WORK/model"
cat > "$WORK/.env" <<ENV
REDIS_PASSWORD=smoke-redis-pw
POPE_API_TOKEN=smoke-token
ENGINE_API_KEY=smoke-engine-key
MODEL_DIR=$PWD/$WORK/model
POPE_CONFIG=$PWD/configs/compose-cpu.yaml
ROLLOUT_PORT=18000
VERIFIER_REPLICAS=1
POPE_IMAGE=$POPE_IMAGE
REDIS_IMAGE=$REDIS_IMAGE
ENV
[ -x .venv/bin/podman-compose ] || .venv/bin/pip install --quiet podman-compose
compose() { .venv/bin/podman-compose --project-name "$PROJECT" --env-file "$WORK/.env" --profile cpu "$@"; }
cleanup() { say "stopping the stack"; compose down -v > "$WORK/down.log" 2>&1 || true; }
trap cleanup EXIT
say "podman-compose --profile cpu up -d"
compose up -d > "$WORK/up.log" 2>&1 || { tail -40 "$WORK/up.log"; exit 1; }

API=http://127.0.0.1:18000
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" > /dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            say "timed out waiting for $what"; podman ps -a --format '{{.Names}} {{.Status}}'
            for c in $(podman ps -a --format '{{.Names}}' | grep "$PROJECT"); do echo "--- $c"; podman logs --tail 15 "$c"; done
            exit 1
        fi
        sleep 3
    done
}
wait_for 600 "the rollout API" curl -fsS "$API/readyz"
say "rollout ready; containers: $(podman ps --format '{{.Names}}' | grep "$PROJECT" | tr '\n' ' ')"
curl -fsS -X POST "$API/v1/problems" -H "Authorization: Bearer smoke-token" -H 'Content-Type: application/json' \
    --data @data/demo_problems.json
echo
step_done() {
    curl -fsS "$API/v1/status" | .venv/bin/python -c '
import json, sys
s = json.load(sys.stdin)
t, e = s["trainer"].get("version", 0), s["engine"]["weight_version"]
print(f"trainer step {t}, engine weight version {e}", file=sys.stderr)
sys.exit(0 if t >= 1 and (e or 0) >= 1 else 1)'
}
wait_for 900 "a training step and the engine's new weights" step_done
say "status: $(curl -fsS "$API/v1/status" | .venv/bin/python -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({"trainer_step": s["trainer"]["version"], "engine_weight_version": s["engine"]["weight_version"], "loss": s["trainer"].get("loss")}))')"
say "PASS: a training step completed in containers and the engine serves the new weights"
