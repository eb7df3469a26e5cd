#!/usr/bin/env bash
# The image and compose files under a real Docker engine, end to end, on a CPU host with tiny models:
#   build the CPU image against a given llama.cpp base -> compose up the tiny profile -> healthy -> chat and
#   /status -> the pin as the wrapper sees it -> stop (exit code, one SIGTERM) -> a misspelt profile stops
#   after a bounded number of restarts -> two pinned instances side by side, claims shared across containers.
#
#   scripts/container-e2e.sh [LLAMA_IMAGE]        (default ghcr.io/ggml-org/llama.cpp:server-b11434)
#
# Options (environment):
#   UV_IMAGE=...            the uv image to copy uv from (default: the Dockerfile's)
#   PYTHON_SOURCE=system    use the base image's python3 instead of downloading uv's managed CPython
#   CA_BUNDLE=path.pem      a PEM bundle the build stage trusts (a TLS-intercepting proxy); a build secret
#   E2E_NETWORK=host        containers and the build on the host's network (a runner without bridge networking)
#   DOCKER=docker           the docker CLI (BuildKit is needed: the Dockerfile mounts a build secret)
#   KEEP=1                  leave the containers and the work directory behind for a look
# Prints one `e2e:` line per check and a summary with the measured times; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

base=${1:-ghcr.io/ggml-org/llama.cpp:server-b11434}
docker=${DOCKER:-docker}
network=${E2E_NETWORK:-bridge}
image=wrapper:e2e
project=wrapper-e2e
work=$(mktemp -d)
chmod 0755 "$work"
port1=18080 status1=18201 port2=18081 status2=18202

say() { printf 'e2e: %s\n' "$*"; }
fail() { printf 'e2e: FAIL: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

compose() {
  "$docker" compose -p "$project" -f docker-compose.yml -f docker-compose.cpu.yml -f "$work/compose.e2e.yml" "$@"
}
cleanup() {
  local rc=$?
  if [ "${KEEP:-0}" != 1 ]; then
    compose --profile second down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
  else
    say "kept: project $project, work directory $work"
  fi
  exit "$rc"
}
trap cleanup EXIT

# --- build --------------------------------------------------------------------------------------------
build_args=(--build-arg "LLAMA_IMAGE=$base" --build-arg "PYTHON_SOURCE=${PYTHON_SOURCE:-managed}")
[ -n "${UV_IMAGE:-}" ] && build_args+=(--build-arg "UV_IMAGE=$UV_IMAGE")
[ -n "${CA_BUNDLE:-}" ] && build_args+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
[ "$network" = host ] && build_args+=(--network host)
t0=$(now)
DOCKER_BUILDKIT=1 "$docker" build -q -t "$image" "${build_args[@]}" . >/dev/null || fail "image build"
build_s=$(since "$t0")
code_layer=$("$docker" history --format '{{.Size}} {{.CreatedBy}}' "$image" | awk '/COPY \/stage\// { print $1 }')
say "built $image on $base in ${build_s}s (code layer ${code_layer:-?})"

# --- tiny models and a registry with pinned profiles, mounted as the docs say ------------------------------
mkdir -p "$work/models" "$work/config"
chmod 0777 "$work/models"
"$docker" run --rm --network none -v "$work/models:/app/models" "$image" \
  python -m wrapper.model.tiny_models /app/models >/dev/null || fail "tiny models in the container"
cp config/llm_profiles.yaml "$work/config/llm_profiles.yaml"
cat >>"$work/config/llm_profiles.yaml" <<'YAML'

  # --- container-e2e.sh: the tiny models pinned to host GPUs 1 and 0 ---
  e2e-dense-gpu1:
    task_type: chat
    model_id: "e2e-dense"
    llamacpp: {model_path: "models/tiny-dense.gguf", ctx_size: 1024, parallel: 2, threads: 1}
    gpu: {device_ids: [1]}
    selfcheck: {max_tokens: 16, prompt_tokens: 32, warmup_requests: 0}
  e2e-moe-gpu0:
    task_type: chat
    model_id: "e2e-moe"
    llamacpp: {model_path: "models/tiny-moe.gguf", ctx_size: 1024, parallel: 2, threads: 1}
    gpu: {device_ids: [0]}
    selfcheck: {max_tokens: 16, prompt_tokens: 32, warmup_requests: 0}
YAML

# The CPU file hides every GPU; here the profiles' pins must reach the wrapper, so that variable is unset
# (blank = unset) and the pin is bookkeeping only on this CPU build.
{
  echo "services:"
  for svc in llm llm2; do
    if [ "$svc" = llm ]; then p=$port1 s=$status1; else p=$port2 s=$status2; fi
    echo "  $svc:"
    echo "    image: $image"
    echo "    environment:"
    echo "      CUDA_VISIBLE_DEVICES_OVERRIDE: \"\""
    if [ "$network" = host ]; then
      echo "      LLAMACPP_PORT_OVERRIDE: \"$p\""
      echo "      WRAPPER_STATUS_PORT: \"$s\""
      echo "    network_mode: host"
      echo "    ports: !reset []"
    else
      echo "    ports: !override [\"$p:8080\", \"$s:8201\"]"
    fi
    echo "    volumes:"
    echo "      - $work/models:/app/models:ro"
    echo "      - $work/config:/app/config:ro"
  done
} >"$work/compose.e2e.yml"

health() { "$docker" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1" 2>/dev/null; }
cid() { compose ps -aq "$1"; }
wait_healthy() { # service status_port timeout -> prints seconds until /healthz said 200 and Docker said healthy
  local svc=$1 sport=$2 limit=$3 start ready=""
  start=$(now)
  while :; do
    [ -z "$ready" ] && curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$sport/healthz" 2>/dev/null \
      && ready=$(since "$start")
    [ "$(health "$(cid "$svc")")" = healthy ] && break
    [ "$(awk -v a="$(since "$start")" -v b="$limit" 'BEGIN { print (a > b) }')" = 1 ] && {
      compose logs --tail 30 "$svc" >&2; fail "$svc not healthy within ${limit}s"; }
    sleep 0.5
  done
  echo "${ready:-?} $(since "$start")"
}
chat() { # port -> completion tokens
  curl -fsS --max-time 60 "http://127.0.0.1:$1/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":4,"ignore_eos":true}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"]["completion_tokens"])'
}
json_get() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

# --- one instance: healthy, chat, /status, the pin, stop --------------------------------------------------
export LLM_PROFILE_NAME=e2e-dense-gpu1 LLM2_PROFILE_NAME=e2e-moe-gpu0
[ "$network" = host ] || export LLAMACPP_HOST_PORT=$port1 WRAPPER_STATUS_HOST_PORT=$status1 \
  LLAMACPP2_HOST_PORT=$port2 WRAPPER2_STATUS_HOST_PORT=$status2
compose up -d --no-build llm >/dev/null 2>&1 || fail "compose up"
read -r ready_s healthy_s < <(wait_healthy llm "$status1" 120)
say "llm healthy: /healthz 200 after ${ready_s}s, Docker 'healthy' after ${healthy_s}s"
[ "$(chat "$port1")" = 4 ] || fail "chat on $port1"
state=$(curl -fsS "http://127.0.0.1:$status1/status" | json_get 'd["state"]')
[ "$state" = ready ] || fail "/status state $state"
say "chat answered 4 tokens; /status state=ready"

pin=$(compose exec -T llm wrapper flags --profile "$LLM_PROFILE_NAME" --json |
  json_get 'd["cuda_visible_devices"]["value"] + " " + d["cuda_visible_devices"]["origin"]')
[ "$pin" = "1 profile" ] || fail "pin as the wrapper sees it: $pin"
override=$(compose run --rm --no-deps -T -e CUDA_VISIBLE_DEVICES_OVERRIDE=0 llm flags --profile "$LLM_PROFILE_NAME" \
  --json | json_get 'd["cuda_visible_devices"]["value"] + " " + d["cuda_visible_devices"]["origin"]')
[ "$override" = "0 env:CUDA_VISIBLE_DEVICES_OVERRIDE" ] || fail "override: $override"
pid=$(curl -fsS "http://127.0.0.1:$status1/status" | json_get 'd["llama_server"]["pid"]')
child=$(compose exec -T llm sh -c "tr '\\0' '\\n' < /proc/$pid/environ" |
  awk -F= '$1 == "CUDA_VISIBLE_DEVICES" { print $2 }')
[ "$child" = 1 ] || fail "llama-server's CUDA_VISIBLE_DEVICES=$child"
say "pin: wrapper flags says '$pin', llama-server has CUDA_VISIBLE_DEVICES=$child; an override shows '$override'"

t0=$(now)
compose stop llm >/dev/null 2>&1
stop_s=$(since "$t0")
code=$("$docker" inspect -f '{{.State.ExitCode}}' "$(cid llm)")
logs=$(compose logs --no-log-prefix llm 2>&1)
terms=$(grep -c 'sent SIGTERM to llama-server' <<<"$logs" || true)
kills=$(grep -c 'SIGKILL' <<<"$logs" || true)
[ "$code" = 0 ] || fail "exit code after stop: $code"
[ "$terms" = 1 ] && [ "$kills" = 0 ] || fail "SIGTERM sent $terms times, SIGKILL $kills times"
say "stop took ${stop_s}s: exit 0, one SIGTERM to llama-server, no SIGKILL"

# The same container started again (a restart policy, a reboot): the warm start spawns the recorded command
# before the profile is read, and adopts it.
compose start llm >/dev/null 2>&1 || fail "compose start"
read -r warm_ready_s _ < <(wait_healthy llm "$status1" 120)
[ "$(chat "$port1")" = 4 ] || fail "chat on $port1 after the restart"
warm=$(compose logs --no-log-prefix llm 2>&1 | grep -c 'warm start: llama-server was spawned' || true)
[ "$warm" = 1 ] || fail "no warm start on the restart (log lines: $warm)"
compose stop llm >/dev/null 2>&1
say "restarted container: warm start adopted the early llama-server; /healthz 200 after ${warm_ready_s}s"
compose rm -f llm >/dev/null 2>&1

# --- a misspelt profile: bounded restarts, the error last ----------------------------------------------------
t0=$(now)
LLM_PROFILE_NAME=e2e-dense-gpu11 compose up -d --no-build llm >/dev/null 2>&1 || fail "compose up"
while :; do
  status=$("$docker" inspect -f '{{.State.Status}}' "$(cid llm)")
  [ "$status" = exited ] && [ "$("$docker" inspect -f '{{.State.Restarting}}' "$(cid llm)")" = false ] && {
    sleep 3  # the policy may still schedule a restart: it must not
    [ "$("$docker" inspect -f '{{.State.Status}}' "$(cid llm)")" = exited ] && break; }
  [ "$(awk -v a="$(since "$t0")" 'BEGIN { print (a > 120) }')" = 1 ] && fail "misspelt profile still restarting after 120s"
  sleep 1
done
bad_s=$(since "$t0")
restarts=$("$docker" inspect -f '{{.RestartCount}}' "$(cid llm)")
code=$("$docker" inspect -f '{{.State.ExitCode}}' "$(cid llm)")
last=$(compose logs --no-log-prefix llm 2>&1 | grep -v '^ *hint:' | tail -1)
[ "$code" = 2 ] || fail "misspelt profile exit $code"
grep -q "e2e-dense-gpu11" <<<"$last" || fail "last log line: $last"
say "misspelt profile: stopped for good after ${restarts} restarts in ${bad_s}s, exit 2, last line: $last"
compose rm -f llm >/dev/null 2>&1

# --- two pinned instances; claims cross containers -----------------------------------------------------------
compose --profile second up -d --no-build llm llm2 >/dev/null 2>&1 || fail "compose up (two)"
read -r _ h1 < <(wait_healthy llm "$status1" 120)
read -r _ h2 < <(wait_healthy llm2 "$status2" 120)
[ "$(chat "$port1")" = 4 ] && [ "$(chat "$port2")" = 4 ] || fail "chat on both instances"
claims=$(compose exec -T llm2 sh -c 'cat /run/wrapper/instance-*.json; echo' | python3 -c '
import json, sys
print(" ".join(sorted(json.loads(line)["profile"] for line in sys.stdin.read().replace("}{", "}\n{").splitlines() if line.strip())))')
[ "$claims" = "e2e-dense-gpu1 e2e-moe-gpu0" ] || fail "claims seen from llm2: $claims"
say "two instances healthy (${h1}s, ${h2}s), both chat; llm2 sees both claims: $claims"
if [ "$network" = host ]; then
  # A third container, started with plain `docker run`, on llm's port: refused by llm's claim (another
  # container's, through the shared volume) before any bind.
  rc=0
  out=$("$docker" run --rm --network host -v wrapper-instances:/run/wrapper -v "$work/models:/app/models:ro" \
    -v "$work/config:/app/config:ro" -e LLAMACPP_PORT_OVERRIDE=$port1 -e WRAPPER_STATUS_PORT=0 "$image" \
    --profile e2e-moe-gpu0 2>&1) || rc=$?
  [ "$rc" = 2 ] || fail "a clashing third instance exited $rc: $out"
  grep -q "already used by wrapper instance 'e2e-dense-gpu1'" <<<"$out" || fail "third instance: $out"
  say "a third container on llm's port exits 2: $(grep error: <<<"$out")"
fi
t0=$(now)
compose --profile second stop >/dev/null 2>&1
say "both stopped in $(since "$t0")s"
say "PASS: healthy ${healthy_s}s (/healthz ${ready_s}s), stop ${stop_s}s, misspelt profile ${restarts} restarts in ${bad_s}s"
