#!/usr/bin/env bash
# Builds the static binaries and the image, and runs the docker-compose cluster.
#
#   deploy/cluster.sh up      build, start coordinator + 4 workers, follow logs until training ends
#   deploy/cluster.sh down    stop and remove the cluster
#   deploy/cluster.sh build   build binaries and image only
#
# Environment: TRAIN_ARGS (extra coordinator flags), OUT_DIR (default deploy/out), IMAGE
# (default vae-dist:latest), PROJECT (compose project name, default vae), TOKEN_FILE (default: a
# fresh token for each `up`, in target/cluster-secrets/; kept off command lines and logs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
export IMAGE="${IMAGE:-vae-dist:latest}"
export OUT_DIR="${OUT_DIR:-$here/out}"
project="${PROJECT:-vae}"
target=x86_64-unknown-linux-gnu

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose -p "$project" -f "$here/docker-compose.yml" "$@"
  elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -p "$project" -f "$here/docker-compose.yml" "$@"
  else
    echo "cluster.sh: neither 'docker compose' nor 'docker-compose' is installed" >&2
    exit 1
  fi
}

build() {
  if ! docker info >/dev/null 2>&1; then
    echo "cluster.sh: no Docker engine is reachable (is the daemon running?)" >&2
    exit 1
  fi
  # One build at a time: concurrent builds (two test binaries) would share the context below.
  mkdir -p "$root/target"
  exec 9>"$root/target/.cluster-build.lock"
  flock 9
  echo "cluster.sh: building static binaries" >&2
  # A separate target directory keeps these flags from invalidating the normal build cache.
  # One package at a time: built together, cargo would unify common's features and link the
  # coordinator's MNIST downloader into the worker, which never uses it.
  local package
  for package in worker coordinator; do
    (cd "$root" && RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --locked --target "$target" -p "$package" --bins \
      --target-dir "$root/target/static")
  done
  local ctx="$root/target/docker-context"
  rm -rf "$ctx" && mkdir -p "$ctx/bin"
  cp -r "$here/rootfs" "$ctx/rootfs"
  cp "$root/target/static/$target/release/coordinator" "$root/target/static/$target/release/worker" "$ctx/bin/"
  cp "$here/Dockerfile" "$ctx/Dockerfile"
  echo "cluster.sh: building image $IMAGE" >&2
  docker build -q -t "$IMAGE" "$ctx" >/dev/null
}

# A fresh random token for this cluster, readable inside the containers (which run as uid
# 65532) but kept in a directory only this user can enter.
new_token() {
  local dir="$root/target/cluster-secrets"
  mkdir -p "$dir" && chmod 700 "$dir"
  local file="$dir/$project.token"
  (umask 022 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file")
  echo "$file"
}

# The containers write outputs as uid 65532.
writable_out() {
  mkdir -p "$OUT_DIR"
  chown 65532:65532 "$OUT_DIR" 2>/dev/null || chmod a+rwx "$OUT_DIR"
}

up() {
  build
  writable_out
  export TOKEN_FILE="${TOKEN_FILE:-$(new_token)}"
  compose up -d --force-recreate --remove-orphans
  local id
  id="$(compose ps -q coordinator)"
  compose logs -f --no-color &
  local logs=$!
  local code
  code="$(docker wait "$id")"
  sleep 1
  kill "$logs" 2>/dev/null || true
  wait "$logs" 2>/dev/null || true
  echo "cluster.sh: coordinator exited with status $code; outputs in $OUT_DIR" >&2
  return "$code"
}

case "${1:-}" in
  up) up ;;
  down) TOKEN_FILE="${TOKEN_FILE:-/dev/null}" compose down -v --remove-orphans --timeout 5 ;;
  build) build ;;
  *) echo "usage: deploy/cluster.sh up|down|build" >&2; exit 2 ;;
esac
