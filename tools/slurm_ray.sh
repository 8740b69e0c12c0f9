#!/usr/bin/env bash
# Run an nps experiment on a Slurm allocation through Ray: `ray start` on every node, then the driver.
#
#   sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 tools/slurm_ray.sh EXPERIMENT [nps run options]
#   e.g. sbatch --nodes=4 --gpus-per-node=8 --cpus-per-task=64 tools/slurm_ray.sh my.toml --out runs/cifar
#
# --cpus-per-task: every core of a node (Ray's workers live in the `ray start` job steps and get only their CPUs).
#
# Every node needs the same Python environment with nps and Ray (pip install 'nps[ray]'; activate it below) and the
# dataset at the experiment's [dataset] dir (a shared filesystem, or the same path on each node). Outputs need no
# shared filesystem: the driver, on the first node, writes results.h5, base.pt and weights/ under --out.
# Resume after a crash or the end of the allocation: submit the same command again.
#SBATCH --job-name=nps
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=nps-%j.log
set -euo pipefail

EXPERIMENT=${1:?usage: sbatch tools/slurm_ray.sh EXPERIMENT [nps run options]}
shift

# source /path/to/venv/bin/activate            # the environment with nps and Ray, on every node

PORT=${NPS_RAY_PORT:-6379}
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
GPUS=$(srun --nodes=1 --ntasks=1 -w "$HEAD" bash -c 'nvidia-smi -L 2>/dev/null | wc -l')
STEP=(--nodes=1 --ntasks=1 --cpus-per-task="$CPUS")
if [ "$GPUS" -gt 0 ]; then STEP+=(--gres="gpu:$GPUS"); fi

echo "ray head: $HEAD ($HEAD_IP:$PORT), ${#NODES[@]} nodes, $GPUS GPUs and $CPUS CPUs per node"
srun "${STEP[@]}" -w "$HEAD" \
    ray start --head --node-ip-address="$HEAD_IP" --port="$PORT" --num-cpus="$CPUS" --num-gpus="$GPUS" \
    --include-dashboard=false --block &
sleep 15                                        # the head must be up before the workers join
for node in "${NODES[@]:1}"; do
    srun "${STEP[@]}" -w "$node" \
        ray start --address="$HEAD_IP:$PORT" --num-cpus="$CPUS" --num-gpus="$GPUS" --block &
done
sleep 15                                        # nodes that join later get work too

# The driver: this batch step runs on the first node. --plain: a log file, not a terminal.
status=0
nps run "$EXPERIMENT" --ray "$HEAD_IP:$PORT" --plain "$@" || status=$?
kill $(jobs -p) 2>/dev/null || true              # the `ray start --block` steps: every Ray process goes with them
exit $status
