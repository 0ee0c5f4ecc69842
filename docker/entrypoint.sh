#!/bin/sh
# normbench container entrypoint: prepares the environment, then runs the command (exec, so that the
# command gets the signals and its exit status is the container's).
#
# 1. W&B: WANDB_MODE=offline unless WANDB_API_KEY is given (then online); an explicit WANDB_MODE wins.
#    Offline runs land under $WANDB_DIR/wandb and can be uploaded later with `wandb sync`.
# 2. GPU slot: Docker hands every replica of a scaled compose service the same GPUs (a device
#    reservation of count N always means GPUs 0..N-1), so N workers would all train on GPU 0. When
#    NORMBENCH_GPU_LOCK_DIR names a folder shared by the workers of this host (a named volume) and
#    CUDA_VISIBLE_DEVICES is not set, each worker takes an exclusive lock on one free slot there and
#    sees only that slot's GPU. There are (number of GPUs) x NORMBENCH_WORKERS_PER_GPU slots (default
#    1 worker per GPU). The lock lives as long as the command (file descriptor 9 stays open).
set -eu

if [ -z "${WANDB_MODE:-}" ]; then
    if [ -n "${WANDB_API_KEY:-}" ]; then
        WANDB_MODE=online
    else
        WANDB_MODE=offline
    fi
    export WANDB_MODE
fi

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true
    else
        # Device nodes the NVIDIA runtime put in the container: /dev/nvidia0, /dev/nvidia1, ...
        find /dev -maxdepth 1 -name 'nvidia[0-9]*' 2>/dev/null | wc -l
    fi
}

if [ -n "${NORMBENCH_GPU_LOCK_DIR:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n_gpus=$(count_gpus)
    per_gpu=${NORMBENCH_WORKERS_PER_GPU:-1}
    if [ "${n_gpus}" -gt 0 ]; then
        mkdir -p "${NORMBENCH_GPU_LOCK_DIR}"
        n_slots=$((n_gpus * per_gpu))
        slot=0
        claimed=""
        while [ "${slot}" -lt "${n_slots}" ]; do
            exec 9>"${NORMBENCH_GPU_LOCK_DIR}/slot-${slot}.lock"
            if flock -n 9; then
                claimed=${slot}
                break
            fi
            slot=$((slot + 1))
        done
        if [ -z "${claimed}" ]; then
            echo "normbench-entrypoint: all ${n_slots} GPU slots of this host are taken (${n_gpus} GPU(s)" \
                "x NORMBENCH_WORKERS_PER_GPU=${per_gpu}); scale the workers down or raise" \
                "NORMBENCH_WORKERS_PER_GPU" >&2
            exit 1
        fi
        CUDA_VISIBLE_DEVICES=$((claimed % n_gpus))
        export CUDA_VISIBLE_DEVICES
        echo "normbench-entrypoint: GPU slot ${claimed} -> CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES}" >&2
    fi
fi

exec "$@"
