#!/bin/bash
# CPU cost of one training epoch in the CIFAR-10-prefix study's setting (configs/studies/common_cifar10prefix.yaml),
# one torch thread: each method trains for 1 and for 2 epochs without the test evaluation, and bash's `time`
# gives user, system and wall seconds. Epoch 2 costs (2-epoch run) - (1-epoch run); it includes the per-epoch
# validation (PGD-5 on 500 images) and, for A-BSR-Net, AGENT's correction, which starts in epoch 2.
# Usage: benchmarks/epoch_cost.sh > epoch_cost.csv   (run from the repository root; runs go to /tmp/epoch_cost)
#        benchmarks/epoch_cost.sh --smoke            # a seconds-long run at tiny sizes (a test runs it)
# --smoke runs the same loop on the embedded quickstart data at tiny sizes (tiny_cnn, 128 MNIST-5k training
# digits, 64 for validation, PGD-1, no AutoAttack), one method for 1 epoch, with
# ${PYTHON:-.venv/bin/python} -m robust_sparse.cli, into a temporary directory that is removed afterwards;
# a failed smoke run prints its log and exits 1.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TIMEFORMAT="%U %S %R"
specs=("dense:sparsity.method=none" "bsrnet90:sparsity.method=bsrnet sparsity.density=0.1"
       "rigl90:sparsity.method=rigl sparsity.density=0.1 sparsity.update_every=10"
       "absr_paper90:sparsity.method=bsrnet sparsity.density=0.1 agent.enabled=true agent.gamma=0.1 agent.estimator=paper")
epoch_counts="1 2"
root=/tmp/epoch_cost
train=(.venv/bin/robust-sparse train configs/studies/common_cifar10prefix.yaml)
smoke=""
if [ "${1:-}" = "--smoke" ]; then
  smoke=1
  specs=("bsrnet90:sparsity.method=bsrnet sparsity.density=0.1")
  epoch_counts="1"
  root=$(mktemp -d) || exit 1
  trap 'rm -rf "$root"' EXIT
  train=("${PYTHON:-.venv/bin/python}" -m robust_sparse.cli train --set model.name=tiny_cnn
         --set data.train_limit=128 --set data.val_size=64 --set data.batch_size=32 --set val.max_examples=64
         --set val.pgd_steps=1 --set attack.steps=1 --set eval.autoattack_examples=0)
fi
echo "method,epochs,user_seconds,system_seconds,wall_seconds"
for spec in "${specs[@]}"; do
  name=${spec%%:*}; sets=""; for s in ${spec#*:}; do sets="$sets --set $s"; done
  for epochs in $epoch_counts; do
    out=$root/$name-$epochs; rm -rf "$out"
    log=/dev/null; [ -n "$smoke" ] && log=$root/$name-$epochs.log
    if ! t=$( { time "${train[@]}" $sets --set optim.epochs=$epochs \
           --set eval.n_examples=0 --out "$out" --no-progress > "$log" 2>&1; } 2>&1 ) && [ -n "$smoke" ]; then
      cat "$log" >&2; exit 1
    fi
    echo "$name,$epochs,${t// /,}"
  done
done
